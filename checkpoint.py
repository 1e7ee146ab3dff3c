"""checkpoint.py — train.py's checkpoints: only what was trained, each save all-or-nothing.

    save_checkpoint(out_dir, *trained_state(model, opt), state, meta)   # train.py, every save
    state = load_checkpoint(out_dir, model, opt)                        # train.py --init=resume
    model, tok, meta = load_sparse(out_dir)                             # sample, evaluate, bench, export

A checkpoint holds the routers and the LoRA adapters (trained.safetensors), their AdamW moments
and the RNG states (optim.safetensors), and ckpt.json: the base model's name or folder, its
ModelConfig, the LoRA settings and the training config. The base weights are not copied: a
checkpoint is loaded on top of the base it names (load_sparse), which must be the same model.

Also here, what a run needs to stop and continue cleanly: SIGTERM as Ctrl-C (Terminated), and
trimming log.jsonl back to the checkpoint's iteration (trim_log).
"""
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora
import router
from distributed import held_as, whole
from load_weights import LoadError, load, read_part
from model import ModelConfig


CKPT_JSON = "ckpt.json"                 # config, base model reference, training state
CKPT_TENSORS = "trained.safetensors"    # only what was trained: routers, substitutes, LoRA A/B
CKPT_OPTIM = "optim.safetensors"        # AdamW moments and RNG states, to resume training
CKPT_POINTER = "LATEST"                 # one line: the name of the current checkpoint folder
CKPT_PREFIX = "ckpt-"                   # checkpoint folders: ckpt-<iteration>-<random>/

# An out_dir (and each out_dir/stage<k>/) holds its checkpoint as a set: the three files above in
# a folder ckpt-000050-3f9a1c/, and LATEST naming that folder. A save writes a new folder, flushes
# it to disk, and only then replaces LATEST, in one atomic rename; older folders are removed after.
# So a kill -9 at any instant, or a full disk, leaves LATEST naming either the old complete set or
# the new complete one. Every part records its iteration, and a load refuses parts that disagree.
# Checkpoints written before this layout (the three files directly in out_dir) are still read.


class CheckpointError(ValueError):
    """A save that could not complete; the message says what out_dir still holds."""


def trained_parameters(model) -> dict:
    """{name: parameter} of what a run fits or trains (routers, substitutes, LoRA: what its checkpoint holds;
    a substitute's B is fitted, not trained), in the model's order."""
    ours = {id(p) for p in router.parameters(model) + lora.parameters(model)}
    return {n: p for n, p in model.named_parameters() if id(p) in ours}


def save_step(point: str):
    """Called at every point of a save, by name. It does nothing: tests replace it to stop a save
    there, as a kill -9 or a full disk would."""


def fsync(path: Path):
    """Flush a file or a folder's entries to disk, so a power cut cannot reorder the save."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trained_state(model, opt) -> tuple:
    """What a checkpoint keeps of a run: ({name: tensor} of the routers, substitutes and LoRA, {name.key: tensor}
    of their AdamW moments and step counts), whole, as plain tensors.

    Under train.py --fsdp these parameters and moments are shards (DTensors), gathered here into
    whole tensors: every process must call this, in the same order, even those that write nothing.
    """
    params = trained_parameters(model)
    tensors = {n: whole(p.detach()) for n, p in params.items()}
    names = {p: n for n, p in params.items()}
    optim = {}
    for p, s in opt.state.items():
        for k, v in s.items():
            optim[f"{names[p]}.{k}"] = whole(v.detach()).reshape(-1) if k == "step" else whole(v.detach())
    return tensors, optim


def write_parts(folder: Path, tensors: dict, optim: dict, state: dict, meta: dict):
    """trained.safetensors (routers, substitutes, LoRA), optim.safetensors (AdamW moments, RNG), ckpt.json
    (meta plus the JSON training state; state["data_rng"] goes to optim.safetensors).
    tensors, optim: trained_state(model, opt)."""
    it = str(state["iter"])
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / CKPT_TENSORS), metadata={"iter": it})
    save_step("trained written")
    optim = {"rng.torch": torch.get_rng_state(), "rng.data": state.pop("data_rng"),
             **{k: v.contiguous() for k, v in optim.items()}}
    save_file(optim, str(folder / CKPT_OPTIM), metadata={"iter": it})
    save_step("optim written")
    (folder / CKPT_JSON).write_text(json.dumps(dict(meta, train_state=state), indent=1))
    save_step("json written")
    for name in (CKPT_TENSORS, CKPT_OPTIM, CKPT_JSON):
        fsync(folder / name)
    fsync(folder)
    save_step("parts on disk")


def switch_latest(out_dir: Path, name: str):
    """Point LATEST at the folder `name`: write a new pointer, then rename it over the old one."""
    tmp = out_dir / (CKPT_POINTER + ".tmp")
    tmp.write_text(name + "\n")
    fsync(tmp)
    save_step("pointer written")
    os.replace(tmp, out_dir / CKPT_POINTER)
    save_step("pointer switched")
    fsync(out_dir)


def current_name(out_dir: Path):
    """The folder name LATEST holds, or None."""
    pointer = Path(out_dir) / CKPT_POINTER
    return pointer.read_text().strip() if pointer.is_file() else None


def save_checkpoint(out_dir, tensors: dict, optim: dict, state: dict, meta: dict):
    """Write a checkpoint of out_dir as a new set, then make it the current one (see above).
    tensors, optim: trained_state(model, opt)."""
    out_dir, folder = Path(out_dir), None
    previous = current_name(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        folder = out_dir / f"{CKPT_PREFIX}{state['iter']:06d}-{os.urandom(3).hex()}"   # a new name every save
        folder.mkdir()
        save_step("folder made")
        write_parts(folder, tensors, optim, state, meta)
        switch_latest(out_dir, folder.name)
    except OSError as e:   # a full disk, a quota, a read-only file system
        if folder is not None and current_name(out_dir) != folder.name:
            shutil.rmtree(folder, ignore_errors=True)
        kept = f"the previous checkpoint ({previous}) is kept" if previous else "no checkpoint was written"
        raise CheckpointError(f"could not save iteration {state['iter']} to {out_dir} ({e.strerror or e}): "
                              f"{kept}; free some space, then continue with --init=resume") from None
    for old in out_dir.glob(CKPT_PREFIX + "*"):     # older sets, and any a killed save left behind
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    save_step("old sets removed")


def checkpoint_folder(out_dir) -> Path:
    """The folder holding out_dir's current checkpoint: the one LATEST names, or out_dir itself
    when the three files lie directly in it (the older layout, or a ckpt-* folder given directly)."""
    out_dir = Path(out_dir)
    name = current_name(out_dir)
    if name is not None:
        if not (out_dir / name / CKPT_JSON).is_file():
            raise LoadError(f"{out_dir}/{CKPT_POINTER} names {name}, which is missing or incomplete: "
                            "the checkpoint was damaged after it was written; restore it or train again")
        return out_dir / name
    if (out_dir / CKPT_JSON).is_file():
        return out_dir
    raise LoadError(f"no checkpoint in {out_dir} ({CKPT_POINTER} and {CKPT_JSON} missing): train one with "
                    f"`python train.py --out_dir={out_dir}`")


def has_checkpoint(out_dir) -> bool:
    return (Path(out_dir) / CKPT_POINTER).is_file() or (Path(out_dir) / CKPT_JSON).is_file()


def read_checkpoint_meta(out_dir) -> dict:
    """ckpt.json of out_dir's current checkpoint, checked to be one."""
    path = checkpoint_folder(out_dir) / CKPT_JSON
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; restore it or train again") from None
    missing = [k for k in ("base", "model_config", "lora") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise LoadError(f"{path} is not a train.py checkpoint (no {', '.join(missing)}): restore it or train again")
    return meta


def load_trained(model, out_dir):
    """Copy trained.safetensors into a model that has its routers, substitutes and LoRA already attached."""
    folder = checkpoint_folder(out_dir)
    it = read_checkpoint_meta(out_dir).get("train_state", {}).get("iter")
    tensors = read_part(folder, CKPT_TENSORS, it, model.tok_emb.weight.device)
    params = trained_parameters(model)
    missing, unexpected = set(params) - set(tensors), set(tensors) - set(params)
    if missing:
        raise LoadError(f"{folder}/{CKPT_TENSORS} lacks {sorted(missing)[:3]}...: "
                        "the file is incomplete or was written by another configuration; train again or restore it")
    if unexpected:
        raise LoadError(f"{folder}/{CKPT_TENSORS} holds tensors this model lacks "
                        f"({sorted(unexpected)[:3]}...): the checkpoint does not match {CKPT_JSON}")
    for n, p in params.items():
        if tensors[n].shape != p.shape:
            raise LoadError(f"{folder}/{CKPT_TENSORS}: {n} has shape {tuple(tensors[n].shape)}, the model "
                            f"expects {tuple(p.shape)}: the checkpoint does not match {CKPT_JSON}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(held_as(p, tensors[n]))


def load_checkpoint(out_dir, model, opt) -> dict:
    """Resume training: trained tensors, AdamW moments and RNG; returns the JSON training state."""
    state = read_checkpoint_meta(out_dir)["train_state"]
    load_trained(model, out_dir)
    optim = read_part(checkpoint_folder(out_dir), CKPT_OPTIM, state["iter"])
    for n, p in trained_parameters(model).items():
        if f"{n}.exp_avg" in optim:
            opt.state[p] = {"step": optim[f"{n}.step"].reshape(()), "exp_avg": held_as(p, optim[f"{n}.exp_avg"]),
                            "exp_avg_sq": held_as(p, optim[f"{n}.exp_avg_sq"])}
    torch.set_rng_state(optim["rng.torch"])
    state["data_rng"] = optim["rng.data"]
    return state


def check_same_base(trained_cfg: dict, base: ModelConfig, base_name: str):
    """A checkpoint only fits the base model it was trained on."""
    ours = base.to_dict()
    diff = [k for k in ours if k not in ("route", "kv", "sinks", "substitute", "hf_repo") and k in trained_cfg
            and _jsonable(trained_cfg[k]) != _jsonable(ours[k])]
    if diff:
        raise LoadError(f"the checkpoint was trained on a different base model than {base_name} "
                        f"(differs in {', '.join(diff)}): pass the base it was trained from")


def _jsonable(x):
    return json.loads(json.dumps(x))


def load_sparse(out_dir, dtype="float32", device="cpu", base=None):
    """(model, tokenizer, meta) of a train.py checkpoint: base weights + routers, substitutes, LoRA."""
    meta = read_checkpoint_meta(out_dir)
    try:
        model, tok = load(base or meta["base"], dtype, device)
    except LoadError as e:
        if base:
            raise
        raise LoadError(f"the base model this checkpoint was trained on cannot be loaded ({e}); if it "
                        "moved, name its new place with --init=FOLDER") from None
    base = base or meta["base"]
    check_same_base(meta["model_config"], model.cfg, base)
    router.add_routers(model, meta["model_config"]["route"], meta["model_config"]["kv"],
                       sinks=meta["model_config"].get("sinks", True), substitute=meta["model_config"].get("substitute"))
    if meta["lora"]["rank"] > 0:
        lora.inject(model, meta["lora"]["targets"], meta["lora"]["rank"], meta["lora"]["alpha"])
    load_trained(model, out_dir)
    model.requires_grad_(False).eval()
    keep = meta.get("train_config", {}).get("mlp_keep", 1.0)
    if keep < 1:   # a research option: the core runs every MLP neuron
        warnings.warn(f"{out_dir} was trained with --mlp_keep={keep}: sample.py, evaluate.py, bench.py and export.py "
                      f"run it with every MLP neuron; python -m research.neuron_sparsity --ckpt={out_dir} "
                      f"--keeps={keep} runs it as trained", stacklevel=2)
    return model, tok, meta


# ----------------------------------------------------------------------------------------------
# Stopping and continuing a run
# ----------------------------------------------------------------------------------------------

FIXED_ON_RESUME = ("lora_rank", "lora_alpha", "lora_targets", "route", "kv", "substitute",   # what the
                   "prune", "prune_compute", "prune_routed")                                 # tensors mean


def resumed_config(saved: dict, given: dict, out_dir: str, defaults: dict) -> dict:
    """train.py --init=resume: the saved run's config with the command line's changes: each one said, and refused where it
    would change what the checkpoint's tensors are."""
    if "train_config" not in saved:
        raise ValueError(f"the checkpoint in {out_dir} holds no training state: evaluate.py and sample.py read it, "
                         "but it cannot be resumed; start a new run with another --out_dir")
    old = saved["train_config"]
    changed = {k: json.loads(json.dumps(v)) for k, v in given.items()
               if k not in ("init", "out_dir") and k in old and json.loads(json.dumps(v)) != old[k]}
    for k, v in changed.items():
        if k in FIXED_ON_RESUME:
            raise ValueError(f"--{k}={given[k]} but the run in {out_dir} was trained with {k}={old[k]}: a resume "
                             f"cannot change what is trained; drop --{k}, or start a new run with another --out_dir")
    if changed:
        print(f"resuming {out_dir} with changed settings: " + ", ".join(f"{k} {old[k]} -> {v}" for k, v in changed.items()))
    return {**defaults, **old, **given, "base": saved["base"]}


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a scheduler, `kill`): handled like Ctrl-C."""


def on_sigterm(signum, frame):
    raise Terminated


def stopped_by(e: BaseException) -> str:
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)"
    return "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by {type(e).__name__}"


def logged_before(line: str, start: int) -> bool:
    try:
        return json.loads(line)["iter"] < start
    except (json.JSONDecodeError, KeyError, TypeError):   # a line a kill cut short
        return False


def trim_log(path: Path, start: int):
    """Keep log.jsonl's rows of iterations before start: a run killed after its last checkpoint
    logged iterations that the resumed run does again."""
    if path.is_file():
        rows = [r for r in path.read_text().splitlines(keepends=True) if logged_before(r, start)]
        write_text_atomic(path, "".join(rows))


def write_text_atomic(path: Path, text: str):
    """Write a text file whole or not at all: a temporary file beside it, then a rename (a crash
    leaves the old file, or none, never half of the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
