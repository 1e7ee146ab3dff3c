"""A train.py checkpoint is a set: all old or all new, whatever stops a save, and never mixed.

A tiny random model with routers and LoRA, one AdamW step taken, is saved as the "old" state;
another step then changes its trained tensors, their AdamW moments and the RNG, and it is saved
again as the "new" one. The save is stopped at every point it announces (checkpoint.save_step),
as a kill -9 would stop it (an exception that nothing catches) and as a full disk would (OSError
ENOSPC), once for real with SIGKILL in a child process; each time the checkpoint must load as
exactly the old or the new state: the trained tensors, their AdamW moments and step counts, the
torch RNG state and the data sampler's RNG, every one of them.
"""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import lora
import router
from checkpoint import CheckpointError
from conftest import TINY
from load_weights import LoadError
from model import Model, ModelConfig

REPO = Path(__file__).resolve().parent.parent
POINTS = ["folder made", "trained written", "optim written", "json written", "parts on disk",
          "pointer written", "pointer switched", "old sets removed"]
SWITCH = POINTS.index("pointer switched")   # from here on, the new set is the checkpoint


class Killed(BaseException):
    """What a kill -9 leaves: the save stops, and no handler of the save's own runs."""


def sparse_model(seed=0):
    """A tiny model with routers and LoRA, and an AdamW that has taken one step."""
    torch.manual_seed(seed)
    model = Model(ModelConfig(**TINY)).eval().requires_grad_(False)
    router.add_routers(model, "sublayer", "all")
    lora.inject(model, ("wq", "wv"), rank=2, alpha=4.0)
    params = list(checkpoint.trained_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.1)
    train_step(model, opt)
    return model, opt


def train_step(model, opt):
    """One AdamW step on a random batch: new tensors, moments and step counts, and the RNG moved."""
    opt.zero_grad()
    model(torch.randint(3, 64, (1, 6)), masked=True)[0].sum().backward()
    opt.step()


def data_rng(it):
    """The data sampler's RNG state a save of iteration it stores (different for every iteration)."""
    return torch.arange(it, it + 3) * 7


def save(out_dir, model, opt, it):
    meta = dict(base="unused", model_config=model.cfg.to_dict(), lora=dict(rank=2, alpha=4.0, targets=["wq", "wv"]))
    state = dict(iter=it, data_rng=data_rng(it))
    checkpoint.save_checkpoint(out_dir, *checkpoint.trained_state(model, opt), state, meta)


def change(model, opt):
    """Another AdamW step, and every tensor moved further: the moments and the RNG change too."""
    train_step(model, opt)
    with torch.no_grad():
        for p in checkpoint.trained_parameters(model).values():
            p.add_(1.0)


def state_of(model, opt, rng, data) -> dict:
    """{name: tensor} of a run's whole state: trained tensors, their AdamW moments and step
    counts, the torch RNG state and the data sampler's RNG."""
    out = {}
    for n, p in checkpoint.trained_parameters(model).items():
        out[n] = p.detach().clone()
        for k in ("exp_avg", "exp_avg_sq", "step"):
            out[f"{n}.{k}"] = opt.state[p][k].detach().clone()
    return dict(out, **{"rng.torch": rng.clone(), "rng.data": data.clone()})


def loaded(out_dir) -> tuple:
    """(iteration, state_of the run) of out_dir's checkpoint, read the way resume reads it, into
    a model and an AdamW of another seed (whose tensors and moments all differ)."""
    model, opt = sparse_model(seed=1)
    state = checkpoint.load_checkpoint(out_dir, model, opt)
    return state["iter"], state_of(model, opt, torch.get_rng_state(), state["data_rng"])


def snapshot(model, opt, it) -> dict:
    """state_of the run as a save of iteration it, now, stores it."""
    return state_of(model, opt, torch.get_rng_state(), data_rng(it))


def assert_state(out_dir, it, want):
    got_it, got = loaded(out_dir)
    assert got_it == it
    assert sorted(got) == sorted(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n


@pytest.fixture
def old_and_new(tmp_path):
    """out_dir holding the old state (iteration 1); the model already changed to the new one (2)."""
    model, opt = sparse_model()
    old = snapshot(model, opt, 1)
    save(tmp_path / "out", model, opt, 1)
    change(model, opt)
    new = snapshot(model, opt, 2)
    assert all(not torch.equal(old[n], new[n]) for n in old), "old and new should differ in everything"
    return tmp_path / "out", model, opt, old, new


def test_a_save_announces_every_point_and_leaves_one_set(old_and_new, monkeypatch):
    out_dir, model, opt, old, new = old_and_new
    seen = []
    monkeypatch.setattr(checkpoint, "save_step", seen.append)
    save(out_dir, model, opt, 2)
    assert seen == POINTS
    assert_state(out_dir, 2, new)
    sets = sorted(p.name for p in out_dir.iterdir())
    assert len(sets) == 2 and sets[0] == "LATEST" and sets[1].startswith("ckpt-000002-")


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_point_of_a_save_leaves_the_old_or_the_new_state(old_and_new, monkeypatch, point):
    out_dir, model, opt, old, new = old_and_new

    def kill(at):
        if at == point:
            raise Killed
    monkeypatch.setattr(checkpoint, "save_step", kill)
    with pytest.raises(Killed):
        save(out_dir, model, opt, 2)
    if POINTS.index(point) < SWITCH:
        assert_state(out_dir, 1, old)
    else:
        assert_state(out_dir, 2, new)
    monkeypatch.undo()
    change(model, opt)                              # the next save cleans up what the kill left
    want = snapshot(model, opt, 3)
    save(out_dir, model, opt, 3)
    assert_state(out_dir, 3, want)
    assert len(list(out_dir.glob("ckpt-*"))) == 1 and not (out_dir / "LATEST.tmp").exists()


@pytest.mark.parametrize("point", POINTS[:SWITCH])
def test_a_full_disk_keeps_the_old_state_and_says_so(old_and_new, monkeypatch, point):
    out_dir, model, opt, old, new = old_and_new

    def disk_full(at):
        if at == point:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "save_step", disk_full)
    with pytest.raises(CheckpointError) as info:
        save(out_dir, model, opt, 2)
    message = str(info.value)
    assert "could not save iteration 2" in message and "No space left on device" in message
    assert "previous checkpoint (ckpt-000001-" in message and "is kept" in message
    assert_state(out_dir, 1, old)
    assert len(list(out_dir.glob("ckpt-*"))) == 1                     # the partial set is gone


def test_a_full_disk_in_the_middle_of_a_file(old_and_new, monkeypatch):
    """save_file writes half of optim.safetensors, then the disk is full."""
    out_dir, model, opt, old, new = old_and_new
    real = checkpoint.save_file

    def half_then_full(tensors, path, metadata=None):
        if Path(path).name == checkpoint.CKPT_OPTIM:
            real(tensors, path, metadata=metadata)
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata=metadata)
    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save(out_dir, model, opt, 2)
    assert_state(out_dir, 1, old)


def test_first_save_on_a_full_disk_says_nothing_was_written(tmp_path, monkeypatch):
    model, opt = sparse_model()

    def disk_full(at):
        if at == "optim written":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "save_step", disk_full)
    with pytest.raises(CheckpointError, match="no checkpoint was written"):
        save(tmp_path / "out", model, opt, 1)
    with pytest.raises(LoadError, match="no checkpoint in"):
        loaded(tmp_path / "out")


KILL_CHILD = """
import os, signal, sys
sys.path.insert(0, "tests")
import checkpoint, test_checkpoint as t
model, opt = t.sparse_model()
t.change(model, opt)
checkpoint.save_step = lambda at: at == "optim written" and os.kill(os.getpid(), signal.SIGKILL)
t.save(sys.argv[1], model, opt, 2)
"""


def test_a_real_kill_9_in_the_middle_of_a_save(old_and_new):
    out_dir, _, _, old, _ = old_and_new
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(out_dir)], cwd=REPO, capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert len(list(out_dir.glob("ckpt-*"))) == 2                     # the killed save's half set is there ...
    assert_state(out_dir, 1, old)                                     # ... and ignored


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints, and the older layout
# ----------------------------------------------------------------------------------------------

def old_layout(out_dir, model, opt, it):
    """A checkpoint as train.py wrote it before the sets: the three files directly in out_dir."""
    out_dir.mkdir(parents=True)
    meta = dict(base="unused", model_config=model.cfg.to_dict(), lora=dict(rank=2, alpha=4.0, targets=["wq", "wv"]))
    state = dict(iter=it, data_rng=data_rng(it))
    checkpoint.write_parts(out_dir, *checkpoint.trained_state(model, opt), state, meta)


def test_the_older_layout_still_loads(tmp_path):
    model, opt = sparse_model()
    want = snapshot(model, opt, 5)
    old_layout(tmp_path / "old", model, opt, 5)
    assert_state(tmp_path / "old", 5, want)


def test_parts_from_different_saves_are_refused(tmp_path):
    """The older layout's failure: trained.safetensors of iteration 3 beside the rest of iteration 2."""
    model, opt = sparse_model()
    old_layout(tmp_path / "old", model, opt, 2)
    change(model, opt)
    save_file(checkpoint.trained_state(model, opt)[0], str(tmp_path / "old" / checkpoint.CKPT_TENSORS), metadata={"iter": "3"})
    with pytest.raises(LoadError, match=r"trained.safetensors holds iteration 3 but .*ckpt.json iteration 2: "
                                        r"the parts come from different saves"):
        loaded(tmp_path / "old")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "ckpt.json").write_text('{"base": "x",\n'), "ckpt.json is not valid JSON"),
    (lambda d: (d / "ckpt.json").write_text('[1, 2]'), "ckpt.json is not a train.py checkpoint"),
    (lambda d: (d / "trained.safetensors").write_bytes((d / "trained.safetensors").read_bytes()[:200]),
     "trained.safetensors is missing, corrupt or truncated"),
    (lambda d: (d / "optim.safetensors").unlink(), "optim.safetensors is missing, corrupt or truncated"),
])
def test_a_damaged_checkpoint_is_named(old_and_new, damage, message):
    out_dir = old_and_new[0]
    damage(checkpoint.checkpoint_folder(out_dir))
    with pytest.raises(LoadError, match=message) as info:
        loaded(out_dir)
    assert "restore" in str(info.value) and "\n" not in str(info.value)


def test_a_pointer_to_a_missing_set_is_named(old_and_new):
    out_dir = old_and_new[0]
    (out_dir / "LATEST").write_text("ckpt-000009-gone\n")
    with pytest.raises(LoadError, match="LATEST names ckpt-000009-gone, which is missing"):
        loaded(out_dir)


def test_resume_with_another_lora_rank_is_a_clear_error(old_and_new):
    out_dir = old_and_new[0]
    torch.manual_seed(0)
    model = Model(ModelConfig(**TINY)).eval().requires_grad_(False)
    router.add_routers(model, "sublayer", "all")
    lora.inject(model, ("wq", "wv"), rank=3, alpha=4.0)
    with pytest.raises(LoadError, match=r"has shape \(2, 32\), the model expects \(3, 32\)"):
        checkpoint.load_trained(model, out_dir)
