"""tests/test_train.py — the conversion run of train.py on a tiny model folder.

Checks the losses (chunked KL and CE against the direct formulas, value and gradient; KL = 0
with open gates), the routers' fit to the peek rule and the density controller, resume (N
straight = N/2 + resume + N/2, same losses), DDP and FSDP with two CPU processes (losses, held-out
eval and trained weights = one process on the same global batches; FSDP's checkpoint resumed
sharded and loaded by sample.py), bfloat16 (finite losses near float32's),
and the errors a user can cause.
"""
import errno
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint
import controller
import distill
import load_weights
import lora
import router
import sample
import train
from load_weights import NonFiniteError
from conftest import tiny_model_folder
from data.prepare import RandomWindows, consecutive_windows, spread_windows
from test_router import capture, random_routers, tiny_model, tokens

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tiny_hf, tmp_path_factory):
    return tiny_model_folder(tiny_hf, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two small training texts and one held-out text, of words the tiny tokenizer knows."""
    from conftest import WORDS
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    (root / "train").mkdir()
    (root / "val").mkdir()
    for name, n in (("a", 600), ("b", 300)):
        (root / "train" / f"{name}.txt").write_text(" ".join(rng.choice(WORDS[:20]) for _ in range(n)))
    (root / "val" / "c.txt").write_text(" ".join(rng.choice(WORDS[:20]) for _ in range(300)))
    return root


def args(folder, corpus, out_dir, **over):
    base = dict(init=str(folder), data=str(corpus / "train"), val_data=str(corpus / "val"),
                out_dir=str(out_dir), max_iters=4, batch_size=2, seq_len=16, eval_interval=2,
                eval_batches=1, lora_rank=4, target_density=0.7, warmup_iters=1, fit_windows=4,
                dtype="float32")   # not auto: the same numbers on every CPU
    base.update(over)
    return [f"--{k}={v}" for k, v in base.items()]


def log_rows(out_dir):
    return [json.loads(l) for l in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


# --- losses --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [None, 2.0])
def test_chunked_distill_equals_direct(cap, monkeypatch):
    monkeypatch.setattr(distill, "chunk_size", lambda V: 3)     # several chunks, a ragged last one
    torch.manual_seed(0)
    N, d, V = 10, 8, 50
    W = torch.randn(V, d)
    h_t = torch.randn(N, d)
    tgt = torch.randint(V, (N,))
    h1 = torch.randn(N, d, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    kl, ce = distill.DistillLoss.apply(h1, h_t, W, tgt, cap)
    (kl + 0.5 * ce).backward()

    def logits(h):
        s = h @ W.t()
        return s if cap is None else cap * torch.tanh(s / cap)
    logp_s, logp_t = F.log_softmax(logits(h2), -1), F.log_softmax(logits(h_t), -1)
    kl_ref = F.kl_div(logp_s, logp_t, log_target=True, reduction="sum")
    ce_ref = F.cross_entropy(logits(h2), tgt, reduction="sum")
    (kl_ref + 0.5 * ce_ref).backward()
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(h1.grad, h2.grad)


def test_kl_is_zero_at_step_zero(folder):
    cfg = train.read_config(["--init=" + str(folder), "--out_dir=/nonexistent-nanoskip", "--lora_rank=4",
                             "--seq_len=16"])
    model, tok, _ = train.build(cfg)
    x = torch.randint(3, 64, (2, 12))
    kl, ce, records = distill.distill_losses(model, x, ce_weight=1.0)
    assert kl.item() == 0.0
    assert ce.item() > 0
    assert all(r.keep.all() for r in records)


def test_kl_teacher_is_the_base_model_without_adapters(folder):
    """Open routers, random LoRA B: the KL is KL(base model, dense || LoRA student) per token, by
    hand with the base model loaded on its own, and > 0 (the teacher runs without the adapters)."""
    cfg = train.read_config(["--init=" + str(folder), "--out_dir=/nonexistent-nanoskip", "--lora_rank=4",
                             "--seq_len=16"])
    model, _, _ = train.build(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora.adapters(model):
            m.B.copy_(0.1 * torch.randn(m.B.shape, generator=g))
    base, _ = load_weights.load(str(folder), "float32")
    x = torch.randint(3, 64, (2, 12), generator=g)
    kl, _, records = distill.distill_losses(model, x, ce_weight=0.0)     # ce 0: the KL covers every position
    assert records and all(r.keep.all() for r in records)
    with torch.no_grad():
        teacher = F.log_softmax(base(x)[0].float(), -1).flatten(0, 1)    # (B*T, V)
        student = F.log_softmax(model(x, masked=True)[0].float(), -1).flatten(0, 1)
    want = F.kl_div(student, teacher, log_target=True, reduction="sum") / teacher.shape[0]
    assert kl.item() == pytest.approx(want.item(), rel=1e-4) and want > 1e-3


def test_grad_checkpoint_gives_the_same_losses_gradients_and_gate_records(folder):
    """--grad_checkpoint recomputes each block in backward: the same losses and gradients, and the
    records returned by the forward stay one per routed sublayer (the controller reads them after
    backward)."""
    cfg = train.read_config(["--init=" + str(folder), "--out_dir=/nonexistent-nanoskip", "--lora_rank=4",
                             "--seq_len=16"])
    model, _, _ = train.build(cfg)
    x = torch.randint(3, 64, (2, 12))
    with torch.no_grad():
        for _, _, r in router.routers(model):
            r.proj.weight.normal_(0, 1)                                    # logits that differ by token
    controller.set_density(model, [x], dict(attn=0.5, mlp=0.5), 0.7)          # some gates closed
    runs = []
    for checkpointed in (False, True):
        model.grad_checkpoint = checkpointed
        model.zero_grad(set_to_none=True)
        kl, ce, records = distill.distill_losses(model, x, ce_weight=1.0)
        n_records = len(records)
        (kl + ce + router.l1_loss(records, dict(attn=1.0, mlp=1.0))).backward()
        assert len(records) == n_records == 2 * model.cfg.n_layers, checkpointed
        grads = {n: p.grad.clone() for n, p in checkpoint.trained_parameters(model).items() if p.requires_grad}
        runs.append((kl.item(), ce.item(), [bool(r.keep.all()) for r in records], grads))
    (kl0, ce0, keep0, g0), (kl1, ce1, keep1, g1) = runs
    assert kl0 > 0 and kl1 == pytest.approx(kl0, rel=1e-6) and ce1 == pytest.approx(ce0, rel=1e-6)
    assert keep1 == keep0 and not all(keep0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def biases(model):
    return torch.stack([r.proj.bias[0] for _, _, r in router.routers(model)])


def records_of(z_attn, z_mlp):
    return [router.GateRecord(0, "attn", torch.tensor([z_attn]), torch.tensor([z_attn]) > 0),
            router.GateRecord(0, "mlp", torch.tensor([z_mlp]), torch.tensor([z_mlp]) > 0)]


def test_balancing_shift_lands_the_batch_on_its_target():
    records = records_of([-1.0, 0.5, 2.0, 3.0], [-2.0, -0.5, 1.0, 4.0])
    weights = {"attn": 1.0, "mlp": 3.0}
    for target in (0.25, 0.4, 0.5, 0.6, 0.8, 1.0):
        s = controller.balancing_shift(*controller.gate_logits(records, weights), target)
        shifted = [router.GateRecord(r.layer, r.kind, r.z - s, r.z - s > 0) for r in records]
        density = router.GateStats(shifted).mean(weights=weights)
        # the smallest density the logits allow at or above the target (steps of 1/16 and 3/16)
        assert target <= density < target + 3 / 16 + 1e-9
    shift = lambda target: controller.balancing_shift(*controller.gate_logits(records, weights), target)
    assert shift(0.5) == pytest.approx(0.75)                            # mlp 1.0 kept | attn 0.5 dropped
    assert shift(0.25) == pytest.approx(2.5)                            # mlp 4.0 keeps alone


def test_fixed_gates_count_but_never_move_and_an_unreachable_target_opens_the_rest():
    """A hybrid's closed sublayer (mlp here: only its sink keeps) weighs in the density but no
    shift reopens it: a target above what the movable gates can give opens them all, no more."""
    records = records_of([-3.0, -2.0, -1.0, 1.0], [30.0, -30.0, -30.0, -30.0])
    weights = {"attn": 1.0, "mlp": 1.0}
    z, share = controller.gate_logits(records, weights, fixed={(0, "mlp")})
    assert z[4:].tolist() == [math.inf, -math.inf, -math.inf, -math.inf]
    assert controller.balancing_shift(z, share, 0.5) == pytest.approx(-2.5)       # attn keeps 3 of 4, mlp 1 of 4
    assert controller.balancing_shift(z, share, 0.9) == pytest.approx(-3.5)       # out of reach: all of attn keeps


def test_controller_shifts_every_router_by_its_share_of_the_balancing_shift(folder):
    model, _ = load_weights.load(str(folder))
    router.add_routers(model)
    before = biases(model).clone()
    c = controller.DensityController([0.6], stage_iters=20, anneal=0.5, gain=0.5)
    assert c.target(0) == 0.6 and c.target(50) == 0.6                   # the first stage starts there
    weights = {"attn": 1.0, "mlp": 1.0}
    dense = records_of([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0])   # all keep: too dense
    c.update(model, 5, dense, weights)                                  # every gate closes by half of 2.5
    torch.testing.assert_close(biases(model), before - 1.25)
    sparse = records_of([-4.0, -3.0, -2.0, -1.0, 0.0], [-4.0, -3.0, -2.0, -1.0, 0.0])
    c.update(model, 6, sparse, weights)                                 # too sparse: they open by half of 2.5
    torch.testing.assert_close(biases(model), before)


def test_the_controller_settles_where_a_proportional_step_would_swing():
    """Logits that crowd the threshold (uniform on 0.8: the density moves 1.25 per unit of
    shift): the old step 2 * (density - target) overshoots further every step, while half the
    balancing shift settles on the target."""
    z0 = torch.linspace(-0.2, 0.6, 4000)                               # density 0.75 at bias 0
    weights = {"attn": 1.0, "mlp": 1.0}
    def density(bias):
        return float(((z0 + bias) > 0).float().mean())
    proportional, balanced = 0.0, 0.0
    for _ in range(12):
        proportional -= 2.0 * (density(proportional) - 0.5)
        z = z0 + balanced
        logits = controller.gate_logits(records_of(z[:2000].tolist(), z[2000:].tolist()), weights)
        balanced -= 0.5 * controller.balancing_shift(*logits, 0.5)
    assert abs(density(balanced) - 0.5) < 0.01
    assert abs(density(proportional) - 0.5) > 0.2


def test_fit_routers_is_least_squares_on_the_residual_moves(folder):
    """Without the ridge penalty, router z + log(saving) is the least-squares fit of
    log(|f(x)| / |h|) on the router's input, measured on the dense model."""
    model, _ = load_weights.load(str(folder))
    router.add_routers(model)
    x = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    savings = {"attn": 3.0, "mlp": 5.0}
    controller.fit_routers(model, [x[:2], x[2:]], savings, ridge=0.0)
    moves = controller.sublayer_io(model, x)                                # the dense model: LoRA not attached
    assert len(moves) == 2 * model.cfg.n_layers
    for layer, kind, r in router.routers(model):
        h, x_norm, y = moves[(layer, kind)]                             # position 0, a sink, left out
        inputs, target = x_norm[:, 1:].flatten(0, 1), router.log_move(h, y)[:, 1:].flatten()   # (N, d), (N,)
        xa = torch.cat([inputs, torch.ones(len(inputs), 1)], 1).double()
        w = torch.linalg.lstsq(xa, target.double()[:, None]).solution[:, 0]
        with torch.no_grad():
            z = r(inputs[None])[0].double() + math.log(savings[kind])
        torch.testing.assert_close(z, xa @ w, rtol=1e-3, atol=1e-3)
        assert target.std() > 0.05                                      # the fit has something to explain


def test_sublayer_io_is_what_enters_and_leaves_each_sublayer():
    """sublayer_io's (h, x_norm, y) against hooks of the test's own on a dense pass of a model with
    sandwich norms (so y is not the sublayer's raw output): h enters the sublayer's norm, x_norm
    leaves it, and h + y is the stream the next sublayer (or the final norm) receives. Random
    routers: sublayer_io runs with them off."""
    model = tiny_model("gemma")
    idx = tokens()
    norms = [n for block in model.layers for n in (block.attn_norm, block.mlp_norm)] + [model.norm]
    enters, leaves = [capture(n, pre=True) for n in norms], [capture(n) for n in norms]
    with torch.no_grad():
        model(idx)                                                      # no routers yet: the dense model
    enters, leaves = [seen[0] for seen in enters], [seen[0] for seen in leaves]   # this pass's
    router.add_routers(model)
    random_routers(model)
    found = controller.sublayer_io(model, idx)
    assert sorted(found) == [(l, k) for l in range(model.cfg.n_layers) for k in ("attn", "mlp")]
    for (layer, kind), (h, x_norm, y) in found.items():
        i = 2 * layer + (kind == "mlp")                                 # this sublayer's norm in norms
        assert torch.equal(h, enters[i]) and torch.equal(x_norm, leaves[i]), (layer, kind)
        torch.testing.assert_close(h + y, enters[i + 1], msg=f"{(layer, kind)}")


def test_set_density_reaches_the_target(folder):
    model, _ = load_weights.load(str(folder))
    router.add_routers(model)
    x = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    weights = {"attn": 1.0, "mlp": 3.0}
    controller.fit_routers(model, [x], weights)
    density = controller.set_density(model, [x[:2], x[2:]], weights, 0.6, tol=0.02)
    with torch.no_grad():
        measured = router.GateStats(model(x)[1]).mean(weights=weights)
    assert density == pytest.approx(0.6, abs=0.02) and measured == pytest.approx(density, abs=1e-6)


def test_training_and_eval_windows_count_bos_the_same_way():
    """seq_len text tokens per window, BOS in front when the tokenizer adds one (scoring.py's convention)."""
    toks = np.arange(3, 103, dtype=np.uint32)
    for bos in (None, 1):
        windows = [RandomWindows({"t": toks}, 16, bos, seed=0).batch(3), spread_windows({"t": toks}, 16, bos, 2),
                   consecutive_windows(toks.tolist(), 16, bos)]
        for x in windows:
            assert x.shape[1] == 16 + (bos is not None) and x.dtype == torch.long
            assert (x[:, 0] == 1).all() == (bos is not None)
            assert (x[:, 1:].diff(dim=1) == 1).all()            # consecutive text tokens


# --- runs -----------------------------------------------------------------------------------------

def test_stages_slide_from_target_to_target():
    c = controller.DensityController([0.9, 0.6], stage_iters=10, anneal=0.5, gain=1.0)
    assert [round(c.target(i), 3) for i in (0, 5, 9, 10, 12, 15, 19, 40)] == [0.9, 0.9, 0.9, 0.9, 0.78, 0.6, 0.6, 0.6]


def test_each_stage_decays_its_learning_rate_over_its_own_length():
    config = dict(max_iters=100, target_density=(0.9, 0.8), warmup_iters=10, min_lr_frac=0.1)
    lr = [train.lr_at(it, config) for it in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0 and lr[10] == 1.0    # warmup, then the first cosine
    assert lr[30] == pytest.approx(0.55) and lr[50] == 1.0                  # its middle; a warm restart
    assert lr[75] == pytest.approx(0.55) and 0.1 < lr[99] < 0.11            # the second stage: its middle, its end


def test_training_moves_the_gates_and_writes_a_loadable_checkpoint(folder, corpus, tmp_path, monkeypatch):
    """Two targets, 0.7 then 0.4: the controller shifts every router by one common amount after
    every step, from that step's gate records, and the density follows it down (the routers'
    own learning rate could not move it that far in 4 steps); each stage keeps a checkpoint."""
    shifts, update = [], controller.DensityController.update

    def spy(self, model, it, records, weights, world=1):
        before = biases(model).clone()
        update(self, model, it, records, weights, world)
        shifts.append((it, len(records), before - biases(model)))
    monkeypatch.setattr(controller.DensityController, "update", spy)
    train.train(train.read_config(args(folder, corpus, tmp_path / "run", max_iters=8, target_density="0.7,0.4")))
    rows = log_rows(tmp_path / "run")
    assert len(rows) == 8 and rows[0]["kl"] > 0.0             # the fitted routers skip from step 0
    init = json.loads((tmp_path / "run" / "routers_init.json").read_text())
    assert init["density"] == pytest.approx(0.7, abs=0.05)    # ... at the target density (64 tokens)
    assert [(it, n) for it, n, _ in shifts] == [(it, 4) for it in range(8)]   # every step, its 4 records
    for _, _, moved in shifts:                                # one common shift lands on every router
        torch.testing.assert_close(moved, moved[:1].expand_as(moved))
    assert shifts[5][2][0] > 0.3                             # ... closing them when the target falls
    # the controller holds the first target, then brings the density down to the second
    assert [r["target"] for r in rows] == pytest.approx([0.7] * 5 + [0.4] * 3)
    assert max(abs(r["density"] - 0.7) for r in rows[:5]) < 0.15
    assert rows[-1]["density"] < 0.55
    assert "val_kl" in rows[-1] and "compute_ratio" in rows[-1]
    model, tok, meta = checkpoint.load_sparse(tmp_path / "run")
    assert meta["train_state"]["iter"] == 8
    # what trains has moved: every router's weights from their fit, every LoRA B from 0
    fitted = {(r["layer"], r["kind"]): r["weight_norm"] for r in init["routers"]}
    for layer, kind, r in router.routers(model):
        assert r.proj.weight.norm().item() != pytest.approx(fitted[(layer, kind)], rel=1e-6)
    lora_b = [m.B for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert lora_b and all(b.abs().max() > 0 for b in lora_b)
    # two targets: the first stage's end is kept as its own checkpoint
    assert checkpoint.load_sparse(tmp_path / "run" / "stage1")[2]["train_state"]["iter"] == 4
    x = torch.randint(3, 64, (1, 10))
    _, records = model(x)
    assert len(records) == 2 * model.cfg.n_layers


def test_ctrl_c_then_resume_continues_exactly(folder, corpus, tmp_path, monkeypatch):
    train.train(train.read_config(args(folder, corpus, tmp_path / "straight")))
    lr_at = train.lr_at

    def interrupt_at_2(it, cfg):   # Ctrl-C arrives inside iteration 2
        if it == 2:
            raise KeyboardInterrupt
        return lr_at(it, cfg)
    monkeypatch.setattr(train, "lr_at", interrupt_at_2)
    with pytest.raises(KeyboardInterrupt):      # saved, then passed on: main() exits with 130
        train.train(train.read_config(args(folder, corpus, tmp_path / "halves")))
    monkeypatch.setattr(train, "lr_at", lr_at)
    assert checkpoint.read_checkpoint_meta(tmp_path / "halves")["train_state"]["iter"] == 2
    train.train(train.read_config(["--init=resume", f"--out_dir={tmp_path / 'halves'}"]))
    straight, halves = log_rows(tmp_path / "straight"), log_rows(tmp_path / "halves")
    assert [r["iter"] for r in halves] == [0, 1, 2, 3]
    for a, b in zip(straight, halves):
        for key in ("kl", "l1", "density"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["iter"], key)


def test_an_error_after_a_step_saves_the_last_good_state_then_propagates(folder, corpus, tmp_path, monkeypatch):
    lr_at = train.lr_at

    def error_at_3(it, cfg):
        if it == 3:
            raise RuntimeError("something broke")
        return lr_at(it, cfg)
    monkeypatch.setattr(train, "lr_at", error_at_3)
    with pytest.raises(RuntimeError, match="something broke"):
        train.train(train.read_config(args(folder, corpus, tmp_path / "run", max_iters=6, eval_interval=10)))
    assert checkpoint.read_checkpoint_meta(tmp_path / "run")["train_state"]["iter"] == 3
    monkeypatch.setattr(train, "lr_at", lr_at)
    train.train(train.read_config(["--init=resume", f"--out_dir={tmp_path / 'run'}"]))
    assert [r["iter"] for r in log_rows(tmp_path / "run")] == list(range(6))


class NanGradient(torch.autograd.Function):
    """The identity, whose gradient is NaN: a finite loss with a broken backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_nan_stops_the_run_before_the_weights_and_keeps_the_last_good_state(folder, corpus, tmp_path,
                                                                              monkeypatch, poison):
    losses, calls = distill.distill_losses, []

    def nan_in_iteration_2(model, x, ce_weight, student=None):
        kl, ce, records = losses(model, x, ce_weight, student)
        calls.append(x)
        if len(calls) == 3:
            kl = kl * math.nan if poison == "loss" else NanGradient.apply(kl)
        return kl, ce, records
    monkeypatch.setattr(train, "distill_losses", nan_in_iteration_2)
    with pytest.raises(NonFiniteError, match=r"^iteration 2: .*nan.*the step was not applied; likely causes: "
                                             r"damaged weights .* --dtype=float32"):
        train.train(train.read_config(args(folder, corpus, tmp_path / "run", eval_interval=10)))
    meta = checkpoint.read_checkpoint_meta(tmp_path / "run")
    assert meta["train_state"]["iter"] == 2 and [r["iter"] for r in log_rows(tmp_path / "run")] == [0, 1]
    model, _, _ = checkpoint.load_sparse(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in checkpoint.trained_parameters(model).values())


SIGNAL_AT_3 = """
import os, signal, sys
import train
lr_at, sig = train.lr_at, getattr(signal, sys.argv[1])
# a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: restore
# Ctrl-C's KeyboardInterrupt so that the test does not depend on how pytest was launched
signal.signal(signal.SIGINT, signal.default_int_handler)

def signal_at_3(it, config):
    if it == 3:
        os.kill(os.getpid(), sig)
    return lr_at(it, config)
train.lr_at = signal_at_3
sys.argv = ["train.py"] + sys.argv[2:]
train.main()
"""


@pytest.mark.parametrize("sig, code, saved", [("SIGINT", 130, 3), ("SIGTERM", 143, 3), ("SIGKILL", -9, 2)])
def test_a_signal_leaves_a_checkpoint_and_an_exit_code(folder, corpus, tmp_path, sig, code, saved):
    """Ctrl-C and SIGTERM save the last step; a kill -9 loses at most save_interval steps."""
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", SIGNAL_AT_3, sig, *args(folder, corpus, out, max_iters=6)],
                           cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.returncode == code, child.stderr[-2000:]
    assert checkpoint.read_checkpoint_meta(out)["train_state"]["iter"] == saved
    if sig == "SIGKILL":   # iteration 2 was logged after the last checkpoint: the resume does it again, once
        with open(out / "log.jsonl", "a") as log:
            log.write('{"iter": 3, "kl"')                            # and a kill can cut a line short
        train.train(train.read_config(["--init=resume", f"--out_dir={out}"]))
        train.train(train.read_config(args(folder, corpus, tmp_path / "straight", max_iters=6)))
        for a, b in zip(log_rows(tmp_path / "straight"), log_rows(out), strict=True):   # as if never killed
            assert a["iter"] == b["iter"] and a["kl"] == pytest.approx(b["kl"], rel=1e-6, abs=1e-9)


def torchrun(*argv):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *argv], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_match_one(folder, corpus, tmp_path, capsys, fsdp):
    """Two gloo processes of batch 2 (DDP, or FSDP with the model sharded) = one process of batch 4
    on the same global batches, step after step: the later steps' losses depend on the averaged
    gradients of the earlier. The held-out eval runs in both (under FSDP on both ranks). The FSDP
    run stops after 2 steps and resumes for the third (its shards of the routers, LoRA and AdamW
    moments filled from the whole tensors of the checkpoint), and sample.py loads its checkpoint.
    min_lr_frac=1: a constant learning rate after warmup, the same whatever max_iters is."""
    common = dict(val_data=str(corpus / "val"), ce=0.5, grad_accum=2, router_lr=0.1, min_lr_frac=1.0)
    one = args(folder, corpus, tmp_path / "one", max_iters=3, batch_size=4, eval_batches=1, **common)
    two = args(folder, corpus, tmp_path / "two", max_iters=2 if fsdp else 3, batch_size=2, eval_batches=2,
               fsdp=fsdp, **common)
    subprocess.run([sys.executable, "train.py", *one], cwd=REPO, check=True, capture_output=True)
    torchrun(*two)
    if fsdp:
        torchrun("--init=resume", f"--out_dir={tmp_path / 'two'}", "--max_iters=3")
    ones, twos = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    assert len(ones) == len(twos) == 3
    assert ones[0]["kl"] > 0   # the fitted gates start partly closed, so there is a loss
    for a, b in zip(ones, twos):
        for key in ("kl", "ce", "l1", "density") + (("val_kl",) if "val_kl" in a else ()):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["iter"], key)
    assert "val_kl" in twos[1] and "val_kl" in twos[2]
    trained = [checkpoint.load_sparse(tmp_path / name)[0] for name in ("one", "two")]
    for (n, p), q in zip(checkpoint.trained_parameters(trained[0]).items(),
                         checkpoint.trained_parameters(trained[1]).values()):
        assert type(q) is torch.nn.Parameter                 # whole tensors in the checkpoint
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    texts = []
    for name in ("one", "two"):
        sample.main([f"--ckpt={tmp_path / name}", "--prompt=the cat", "--temperature=0", "--max_new_tokens=8",
                     "--no_color"])
        texts.append(capsys.readouterr().out.splitlines()[0])
    assert texts[0] == texts[1] and texts[0].startswith("the cat")


def test_bfloat16_trains_with_float32_routers_lora_and_kl(folder, corpus, tmp_path):
    """--dtype=bfloat16: the frozen weights and activations in bf16, what trains in float32;
    the losses are finite and close to the float32 run's on the same batches."""
    cfg = train.read_config(args(folder, corpus, tmp_path / "unused", dtype="bfloat16"))
    model, _, _ = train.build(cfg)
    assert model.tok_emb.weight.dtype == model.layers[0].mlp.up.weight.dtype == torch.bfloat16
    assert {p.dtype for p in checkpoint.trained_parameters(model).values()} == {torch.float32}
    x = torch.randint(3, 64, (2, 12))
    kl, ce, records = distill.distill_losses(model, x, ce_weight=1.0)
    assert kl.dtype == ce.dtype == records[0].z.dtype == torch.float32
    runs = {}
    for dtype in ("float32", "bfloat16"):
        train.train(train.read_config(args(folder, corpus, tmp_path / dtype, dtype=dtype, val_data="")))
        runs[dtype] = log_rows(tmp_path / dtype)
    assert len(runs["bfloat16"]) == 4
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        for key in ("kl", "l1", "density"):
            assert math.isfinite(b[key]), (b["iter"], key)
        # 128 gate slots per step: bf16 rounding (in the routers' fit too) flips a few of those whose
        # logit is near 0, and the KL moves with every flipped gate
        assert b["density"] == pytest.approx(a["density"], abs=0.05), b["iter"]
        assert b["kl"] == pytest.approx(a["kl"], rel=0.1) and b["l1"] == pytest.approx(a["l1"], rel=0.05)
    assert runs["bfloat16"][0]["kl"] > 0.01                               # fitted gates partly closed: a real loss
    tensors = load_file(str(checkpoint.checkpoint_folder(tmp_path / "bfloat16") / checkpoint.CKPT_TENSORS))
    assert {t.dtype for t in tensors.values()} == {torch.float32}


# --- errors a user can cause ----------------------------------------------------------------------

def run_cli(*argv):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("problem, over, message", [
    ("missing data", dict(data="/nonexistent/file.txt"), "does not exist"),
    ("empty folder", dict(data="EMPTY"), "holds no .txt or .jsonl"),
    ("short text", dict(data="SHORT"), "fewer than one window"),
    ("short held-out text", dict(val_data="SHORT"), "held-out text 'short' has 2 tokens, fewer than one window"),
    ("binary data", dict(data="BINARY"), "binary.txt is not UTF-8 text (byte 1 is b'\\xff')"),
    ("seq_len over context", dict(seq_len=100000), "over the model's context"),
    ("unknown key", dict(learning_rate=1), "unknown option --learning_rate"),
])
def test_bad_input_is_a_clear_error(folder, corpus, tmp_path, problem, over, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "short.txt").write_text("the cat")
    (tmp_path / "binary.txt").write_bytes(b"\x00\xff\xfe\x00" * 64)
    files = {"EMPTY": tmp_path / "empty", "SHORT": tmp_path / "short.txt", "BINARY": tmp_path / "binary.txt"}
    over = {k: files.get(v, v) for k, v in over.items()}
    run = run_cli(*args(folder, corpus, tmp_path / "out", **over))
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_resume_with_nothing_and_reuse_of_a_full_out_dir(folder, corpus, tmp_path):
    run = run_cli("--init=resume", f"--out_dir={tmp_path / 'nothing'}")
    assert run.returncode == 1 and "no checkpoint in" in run.stderr
    train.train(train.read_config(args(folder, corpus, tmp_path / "run", max_iters=1)))
    run = run_cli(*args(folder, corpus, tmp_path / "run"))
    assert run.returncode == 1 and "already holds a checkpoint" in run.stderr and "--init=resume" in run.stderr


def test_resume_refuses_a_new_lora_rank_and_says_what_else_changed(folder, corpus, tmp_path, capsys):
    train.train(train.read_config(args(folder, corpus, tmp_path / "run", max_iters=1)))
    resume = ["--init=resume", f"--out_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"--lora_rank=2 but the run in .* was trained with lora_rank=4: a resume "
                                         r"cannot change what is trained; drop --lora_rank"):
        train.read_config(resume + ["--lora_rank", "2"])
    capsys.readouterr()
    config = train.read_config(resume + ["--target_density=0.5", "--max_iters=3", "--lora_rank=4"])
    assert config["target_density"] == (0.5,) and config["lora_rank"] == 4
    assert capsys.readouterr().out.strip().endswith("changed settings: target_density [0.7] -> [0.5], max_iters 1 -> 3")


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(folder, corpus, tmp_path, monkeypatch):
    saves = []

    def second_save_fails(at):
        saves.append(at)
        if saves.count("folder made") == 2 and at == "optim written":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "save_step", second_save_fails)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not save iteration 4 .*No space left on device\): "
                                                           r"the previous checkpoint \(ckpt-000002-\S+\) is kept"):
        train.train(train.read_config(args(folder, corpus, tmp_path / "run", max_iters=6)))
    assert checkpoint.read_checkpoint_meta(tmp_path / "run")["train_state"]["iter"] == 2


def test_checkpoint_from_a_different_base_is_refused(folder, corpus, tmp_path, tiny_hf, tmp_path_factory):
    train.train(train.read_config(args(folder, corpus, tmp_path / "run", max_iters=1)))
    other = tiny_model_folder(tiny_hf, tmp_path_factory, "llama", hidden_size=32)
    with pytest.raises(load_weights.LoadError, match="different base model"):
        checkpoint.load_sparse(tmp_path / "run", base=str(other))
