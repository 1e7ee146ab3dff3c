"""train.py — convert a dense model into a sparse one: train routers, LoRA and skip substitutes, nothing else.

    python train.py --init=smollm2-135m-instruct                     # default; --substitute=none is the paper's recipe
    python train.py --init=resume --out_dir=out                       # continue a run
    torchrun --standalone --nproc_per_node=2 train.py --init=...      # data parallel (distributed.py)

Every default is in the block below and can be overridden as --key=value or --key value; RANGES
below it holds the valid values of every numeric flag.

What one step does (the loss is distill.py's):
  teacher = the same weights with LoRA off and the routers off, under no_grad (no second copy);
  student = LoRA on, hard per-token gates, masked path (every sublayer runs, the gate multiplies,
            so each router gets its straight-through gradient);
  loss    = KL(teacher || student) (+ ce * next-token cross-entropy, + l1 * FLOP-weighted L1).
How much is skipped is not left to a loss weight (controller.py): the routers start fitted to
the training-free "peek" rule (keep a token where a skip would lose most per FLOP,
|f(x) - s(x)| / |h|), and after every step a controller shifts all router biases by one common
amount, so the FLOP-weighted density stays at --target_density while the KL decides which tokens and
which sublayers keep their compute. Several targets (--target_density=0.95,0.9,0.85) split the
run into stages, each sliding from the previous one over its first --anneal fraction; every
stage but the last leaves a checkpoint in out_dir/stage<k>/: one run, several operating points.

The run: setup(), init_routers(), then one loop of train_step() and report() (a held-out eval
every eval_interval) with a checkpoint (checkpoint.py, all-or-nothing) every save_interval, at
the end of every stage and of the run. Whatever stops a run early (Ctrl-C, SIGTERM, a NaN or
infinite loss or gradient, any error) first saves its last good state, so --init=resume
continues it; an interrupted run then exits with 130 (Ctrl-C) or 143 (SIGTERM), a failed one 1.

The static baselines and the hybrid (--prune=kl|bi|layer --prune_compute=R [--prune_routed=True])
live in research/prune.py, and --mlp_keep in research/neuron_sparsity.py, loaded only when asked for.
"""
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

import lora
import router
from checkpoint import (CheckpointError, Terminated, has_checkpoint, load_checkpoint, on_sigterm, read_checkpoint_meta,
                        resumed_config, save_checkpoint, stopped_by, trained_parameters, trained_state, trim_log)
from configurator import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Range, check_ranges, overrides
from controller import DensityController, fit_routers, fit_substitutes, set_density
from data.prepare import RandomWindows, load_sources, spread_windows, tokenizer_key
from distill import distill_losses
from distributed import all_reduce_mean, can_save_after, data_parallel, no_sync, setup_distributed, whole
from flops import skip_savings
from load_weights import LIKELY_NONFINITE, LoadError, NonFiniteError, load, resolve
from scoring import compare_dense

DEFAULTS = dict(
    init="smollm2-135m-instruct",  # base model: preset name or HF-format folder; "resume" continues out_dir
    data="data/corpus",            # training text: .txt/.jsonl files or folders, comma-separated
    val_data="data/heldout",       # held-out text for the periodic eval ("" = no periodic eval)
    out_dir="out",
    # run length and batch
    max_iters=100,
    batch_size=2,
    seq_len=256,
    grad_accum=1,
    # optimizer
    lr=2e-3,                       # LoRA adapters, skip substitutes
    router_lr=3e-3,                # router biases (weights: router_lr / sqrt(d))
    warmup_iters=10,
    min_lr_frac=0.1,
    grad_clip=1.0,
    # what is trained
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets="wq,wk,wv,wo,gate,up,down",
    route="sublayer",              # sublayer | attn | mlp | block
    kv="all",                      # all | kept
    fit_windows=8,                 # training windows the routers are fitted on before training
    substitute=8,                  # what a skip adds: r = a fitted rank-r map of x, 0 = its mean, none = 0 (paper)
    # sparsity
    target_density=(0.87,),        # fraction of routed work to keep, FLOP-weighted (one per stage)
    anneal=0.1,                    # fraction of each later stage over which its target slides down
    density_gain=0.5,              # controller: share of the batch's balancing bias shift applied per step
    flop_weighted=True,            # density weighted by the FLOPs each skip saves
    prune="",                      # remove sublayers for every token, ranked by: kl | bi | layer (research/prune.py)
    prune_compute=0.9,             # --prune: remove sublayers until the compute ratio is at most this
    prune_scores="",               # --prune: reuse the ranking in an earlier run's prune.json (same base)
    prune_routed=False,            # --prune: route what it keeps per token (a hybrid) instead of keeping it whole
    mlp_keep=1.0,                  # < 1: each student MLP token keeps that share of its largest neurons (research/)
    l1=0.0,                        # weight of an L1 push on sigmoid(z) (0: the controller alone sets the density)
    ce=0.0,                        # weight of next-token cross-entropy (0 = distillation only)
    # bookkeeping
    eval_interval=50,
    save_interval=0,               # iterations between checkpoints; 0 = every eval_interval
    eval_batches=2,
    seed=1337,
    dtype="auto",                  # frozen weights, activations: auto = bfloat16 where native, else float32
    device="cpu",
    grad_checkpoint=False,
    fsdp=False,                    # torchrun: shard the model across the processes instead of copying it
)
RANGES = dict(   # the valid values of every numeric flag (configurator.check_ranges)
    max_iters=AT_LEAST_1, batch_size=AT_LEAST_1, seq_len=Range(2), grad_accum=AT_LEAST_1,
    lr=AT_LEAST_0, router_lr=AT_LEAST_0, warmup_iters=AT_LEAST_0, min_lr_frac=FRACTION, grad_clip=POSITIVE,
    lora_rank=AT_LEAST_0, lora_alpha=POSITIVE, fit_windows=AT_LEAST_1, substitute=Range(0, or_none=True),
    target_density=FRACTION, anneal=FRACTION, density_gain=FRACTION, l1=AT_LEAST_0, ce=AT_LEAST_0,
    prune_compute=Range(0, 1, open_lo=True), mlp_keep=Range(0, 1, open_lo=True),
    eval_interval=AT_LEAST_1, save_interval=AT_LEAST_0, eval_batches=AT_LEAST_1, seed=AT_LEAST_0,
)


def init_routers(run: "Run"):
    """Fit the routers to the peek rule on --fit_windows training windows, then set their common
    threshold so that the first target density holds there; write out_dir/routers_init.json.
    With --prune, make them the static baseline's constant gates instead (research/prune.py)."""
    config, model = run.config, run.model
    windows = run.data.batch(config["fit_windows"]).to(config["device"])     # the same on every rank
    batches = windows.split(config["batch_size"])
    fit_substitutes(model, batches)                        # what a skip adds, before what skips
    if static(config):
        return baselines().prune_routers(run, batches)
    fit_routers(model, batches, run.savings)
    removed = baselines().prune_routers(run, batches) if config["prune"] else []   # a hybrid: route the rest
    run.ctrl.fixed = set(removed)                         # closed for good: no shift reopens them
    density = set_density(model, batches, run.weights, config["target_density"][0], fixed=run.ctrl.fixed)
    rows = [dict(layer=l, kind=k, bias=whole(r.proj.bias).item(), weight_norm=whole(r.proj.weight).norm().item())
            for l, k, r in router.routers(model)]                    # every rank: --fsdp gathers them
    if run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "routers_init.json").write_text(json.dumps(dict(density=density, routers=rows), indent=1))


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

def stage_iters(config: dict) -> int:
    return max(1, config["max_iters"] // len(config["target_density"]))


def lr_at(it: int, config: dict) -> float:
    """Multiplier of the base learning rates: linear warmup, then cosine down to min_lr_frac
    within each stage (a warm restart when the next target begins)."""
    if it < config["warmup_iters"]:
        return (it + 1) / config["warmup_iters"]
    n = stage_iters(config)
    local = it % n if it < n * len(config["target_density"]) else it - n * (len(config["target_density"]) - 1)
    warm = config["warmup_iters"] if it < n else 0                      # only the first stage warms up
    progress = max(0, local - warm) / max(1, n - warm)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config["min_lr_frac"] + (1 - config["min_lr_frac"]) * cosine


def read_config(argv) -> dict:
    """Defaults, overridden by a resumed run's config, overridden by the command line."""
    given = overrides(DEFAULTS, argv)
    config = dict(DEFAULTS, **given)
    if config["init"] == "resume":
        config = resumed_config(read_checkpoint_meta(config["out_dir"]), given, config["out_dir"], DEFAULTS)
    else:
        if has_checkpoint(config["out_dir"]):
            raise ValueError(f"{config['out_dir']} already holds a checkpoint (of {read_checkpoint_meta(config['out_dir'])['base']}): "
                             "continue it with --init=resume, or choose another --out_dir")
        config["base"] = config["init"]
    check_ranges(config, RANGES)
    if config["prune"]:
        baselines().check_config(config)
    return config


def static(config: dict) -> bool:
    """A static baseline: --prune without --prune_routed (constant gates, no controller)."""
    return bool(config["prune"]) and not config["prune_routed"]


def baselines():
    """research/prune.py (static baselines, the hybrid), loaded for --prune only: no research/ in the core."""
    from research import prune
    return prune


def lora_targets(config: dict) -> list:
    return [t for t in config["lora_targets"].split(",") if t]


def build(config: dict):
    """The base model with routers, skip substitutes and LoRA attached (only those train), its tokenizer, folder."""
    folder = resolve(config["base"])                       # a name may mean a download: once
    model, tok = load(str(folder), config["dtype"], config["device"])
    if config["seq_len"] + tok.adds_bos > model.cfg.max_seq_len:
        raise ValueError(f"--seq_len={config['seq_len']}{' + BOS' if tok.adds_bos else ''} is over the "
                         f"model's context of {model.cfg.max_seq_len}")
    torch.manual_seed(config["seed"])                      # LoRA A init: the same on every rank
    router.add_routers(model, config["route"], config["kv"], substitute=config["substitute"])
    if config["lora_rank"] > 0:
        lora.inject(model, lora_targets(config), config["lora_rank"], config["lora_alpha"])
    for name, p in trained_parameters(model).items():
        p.requires_grad_(not name.endswith("_skip.up"))    # a substitute's B stays as fitted: make_optimizer
    for p in router.parameters(model) if static(config) else []:
        p.requires_grad_(False)                            # a static baseline trains LoRA only
    if config["mlp_keep"] < 1:                             # research/neuron_sparsity.py, loaded only then
        from research.neuron_sparsity import thin_student
        thin_student(model, config["mlp_keep"])
    model.grad_checkpoint = config["grad_checkpoint"]
    return model, tok, folder


def make_optimizer(model, config):
    """AdamW with three learning rates: LoRA (and skip substitutes), router biases, router weights.

    Adam moves every coordinate by about lr per step, so a router weight step shifts the logit
    z = w.x by up to lr * sum|x_i| (d times a bias step), typically ~sqrt(d) times, as the signs of x
    vary. Dividing the weights' rate by sqrt(d) keeps a step's effect on z near the bias's: gates
    move early (the bias) without flipping wholesale from one step to the next (the weights).

    A substitute s(x) = b + (x A) B trains b and A (build): a step on B, the fit's unit directions, moves s(x) by a
    share of x A, the output itself (on Gemma 3, whose first sublayers add ~4x the stream, the KL climbed).
    """
    router_w = [r.proj.weight for _, _, r in router.routers(model)]
    router_b = [r.proj.bias for _, _, r in router.routers(model)]
    w_lr = config["router_lr"] / math.sqrt(model.cfg.dim)
    groups = [dict(params=router_w, lr=w_lr, base_lr=w_lr),
              dict(params=router_b, lr=config["router_lr"], base_lr=config["router_lr"]),
              dict(params=[p for _, _, s in router.substitutes(model) for p in s.parameters() if p.requires_grad],
                   lr=config["lr"], base_lr=config["lr"]),
              dict(params=lora.parameters(model), lr=config["lr"], base_lr=config["lr"])]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)


@dataclass
class Run:
    """What one training run holds between steps."""
    config: dict
    model: torch.nn.Module
    student: torch.nn.Module      # runs the student pass: model, its DDP wrapper or model sharded (data_parallel)
    data: RandomWindows
    val: Optional[torch.Tensor]   # (N, L) fixed held-out windows, or None: no periodic eval
    opt: torch.optim.Optimizer
    ctrl: "DensityController"
    savings: dict                 # {"attn": FLOPs, "mlp": FLOPs} one skip saves
    weights: dict                 # what a skip weighs in the density: savings, or 1 (--flop_weighted=False)
    meta: dict                    # what ckpt.json records besides the training state
    rank: int
    world: int
    out_dir: Path
    start: int = 0                # the first iteration (a resumed run's)


def setup(config: dict) -> Run:
    """Model, data, optimizer and controller of a run (routers not yet fitted, nothing resumed)."""
    rank, world = setup_distributed(config)
    fsdp = config["fsdp"] and world > 1
    model, tok, folder = build(dict(config, device="cpu") if fsdp else config)   # FSDP: shards to the device
    bos, key = (tok.bos_id if tok.adds_bos else None), tokenizer_key(folder)
    data = RandomWindows(load_sources(config["data"], tok, key), config["seq_len"], bos, config["seed"])
    val = spread_windows(load_sources(config["val_data"], tok, key), config["seq_len"], bos,
                         config["eval_batches"] * config["batch_size"]) if config["val_data"] else None
    window = config["seq_len"] + (bos is not None)
    savings = skip_savings(model.cfg, window)
    weights = savings if config["flop_weighted"] else {"attn": 1.0, "mlp": 1.0}
    ctrl = DensityController(config["target_density"], stage_iters(config), config["anneal"], config["density_gain"])
    meta = dict(base=config["base"], model_config=model.cfg.to_dict(),
                lora=dict(rank=config["lora_rank"], alpha=config["lora_alpha"], targets=lora_targets(config)),
                train_config={k: v for k, v in config.items() if k != "base"})
    student = data_parallel(model, world, config)     # before the optimizer: FSDP replaces the parameters
    return Run(config, model, student, data, val, make_optimizer(model, config), ctrl, savings, weights, meta,
               rank, world, Path(config["out_dir"]))


def resume(run: Run):
    """Continue from out_dir's checkpoint: weights, optimizer, RNG, controller, data position."""
    state = load_checkpoint(run.out_dir, run.model, run.opt)
    run.start = state["iter"]
    if run.config["prune_routed"]:                        # a hybrid: what it closed stays out of the shifts
        run.ctrl.fixed = baselines().read_removed(run.out_dir)
    run.data.gen.set_state(state["data_rng"])


def save(run: Run, it: int, folder: Optional[Path] = None):
    tensors, optim = trained_state(run.model, run.opt)     # on every rank: --fsdp gathers the shards
    if run.rank == 0:
        state = dict(iter=it, data_rng=run.data.gen.get_state())
        save_checkpoint(folder or run.out_dir, tensors, optim, state, run.meta)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def train_step(run: Run, it: int) -> dict:
    """One optimizer step over grad_accum micro-batches; returns its row of log.jsonl."""
    config, model, ctrl = run.config, run.model, run.ctrl
    t0 = time.time()
    cuda = torch.device(config["device"]).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(config["device"])
    scale = lr_at(it, config)
    for g in run.opt.param_groups:
        g["lr"] = g["base_lr"] * scale
    B, accum = config["batch_size"], config["grad_accum"]
    sums = dict(kl=0.0, ce=0.0, l1=0.0, density=0.0)
    gates = []                                           # every micro-batch's gate records, for the controller
    for i in range(accum):
        x = run.data.batch(B * run.world)[run.rank * B:(run.rank + 1) * B]   # this rank's share
        # DDP, FSDP: exchange the gradients once, in the last micro-batch's backward
        last = i == accum - 1 or run.world == 1
        with nullcontext() if last else no_sync(run.student):
            kl, ce, records = distill_losses(model, x.to(config["device"]), config["ce"], run.student)
            l1 = router.l1_loss(records, run.weights)
            loss = kl + config["ce"] * ce + config["l1"] * l1
            (loss / accum).backward()
        density = router.GateStats(records).mean(weights=run.weights)   # share of the routed FLOPs run
        gates += records
        for k, v in zip(sums, (kl.item(), ce.item(), l1.item(), density)):
            sums[k] += v / accum
    params = list(trained_parameters(model).values())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config["grad_clip"]))
    sums = dict(zip(sums, all_reduce_mean(list(sums.values()), run.world, config["device"])))
    check_finite(it, dict(sums, grad_norm=grad_norm))    # the same on every rank: DDP reduced the gradients
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if not static(config):                               # a static baseline's gates never move
        ctrl.update(model, it, gates, run.weights, run.world)
    tokens = B * config["seq_len"] * accum * run.world
    target = None if static(config) else ctrl.target(it)     # a static baseline has no density target
    row = dict(iter=it, **sums, target=target, lr_scale=scale, tok_s=tokens / (time.time() - t0))
    if cuda:                                             # the most this step held on the device
        row["peak_gib"] = torch.cuda.max_memory_allocated(config["device"]) / 2**30
    return row


def check_finite(it: int, values: dict):
    """Stop at the first NaN or infinite loss or gradient norm, before it reaches the weights."""
    bad = [f"{k}={v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"iteration {it}: {', '.join(bad)}, so the step was not applied; "
                             f"{LIKELY_NONFINITE}, or learning rates too high (--lr, --router_lr)")


def held_out(run: Run) -> dict:
    """The sparse model against its base on the fixed held-out windows (evaluate.py's numbers)."""
    res = compare_dense(run.model, run.val, run.config["seq_len"], run.config["batch_size"])
    return dict(val_kl=res["kl_to_dense"], val_ppl=res["perplexity"], dense_ppl=res["dense_perplexity"],
                top1=res["top1_agreement"], **{k: res[k] for k in ("density_attn", "density_mlp", "compute_ratio")})


def report(run: Run, row: dict, bar, log):
    """Held-out eval when due (on every rank: under --fsdp a forward needs them all), then on rank 0
    the progress bar and one JSON line in log.jsonl."""
    it, config = row["iter"], run.config
    evals = {}
    if run.val is not None and ((it + 1) % config["eval_interval"] == 0 or it + 1 == config["max_iters"]):
        evals = held_out(run)
    if run.rank != 0:
        return
    shown = dict(kl=f"{row['kl']:.4f}", dens=f"{row['density']:.3f}", tok_s=f"{row['tok_s']:.0f}")
    if row["target"] is not None:                        # a static baseline (--prune) has none
        shown["tgt"] = f"{row['target']:.3f}"
    bar.set_postfix(shown)
    if evals:
        row.update(evals)
        tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in evals.items()))
    log.write(json.dumps(row) + "\n")
    log.flush()


def rng_states(run: Run):
    return torch.get_rng_state(), run.data.gen.get_state()


def forget_step(run: Run, rng_before):
    """Undo a step that stopped before its update: a resume then redraws the same batch."""
    torch.set_rng_state(rng_before[0])
    run.data.gen.set_state(rng_before[1])
    run.opt.zero_grad(set_to_none=True)


def train(config: dict):
    run = setup(config)
    if config["init"] == "resume":
        resume(run)
    else:
        init_routers(run)
    master, log = run.rank == 0, None
    if master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        trim_log(run.out_dir / "log.jsonl", run.start)
        log = open(run.out_dir / "log.jsonl", "a")
        n_trained = sum(p.numel() for p in trained_parameters(run.model).values())
        print(f"training {n_trained:,} parameters (routers, substitutes, LoRA) of a "
              f"{sum(p.numel() for p in run.model.parameters()):,}-parameter model; "
              f"{config['batch_size'] * config['seq_len'] * config['grad_accum'] * run.world} tokens/iter")
    bar = tqdm(range(run.start, config["max_iters"]), initial=run.start, total=config["max_iters"],
               disable=not master)
    done = saved = run.start                              # iterations completed, and in out_dir's checkpoint
    it, rng_before = run.start, rng_states(run)
    every = config["save_interval"] or config["eval_interval"]
    try:
        for it in bar:
            rng_before = rng_states(run)
            row = train_step(run, it)
            done = it + 1
            report(run, row, bar, log)
            stage = done // run.ctrl.stage_iters
            if done % run.ctrl.stage_iters == 0 and stage < len(run.ctrl.targets):   # a stage ends: keep it
                save(run, done, run.out_dir / f"stage{stage}")
            if done % every == 0 and done < config["max_iters"]:
                save(run, done)
                saved = done
    except BaseException as e:   # Ctrl-C, SIGTERM, NaN, any error: keep the last good state, then stop
        if done == it:           # stopped inside a step, before its update: forget it
            forget_step(run, rng_before)
        if done > saved and not isinstance(e, CheckpointError) and can_save_after(run.world, config["fsdp"], e):
            if master:
                tqdm.write(f"{stopped_by(e)}: saving iteration {done} to {run.out_dir} (continue with --init=resume)")
            save(run, done)
        raise
    save(run, done)
    if master:
        print(f"saved {run.out_dir} at iteration {done}")
    if run.world > 1:
        dist.destroy_process_group()
    return run.model


def main():
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        train(read_config(sys.argv[1:]))
    except (LoadError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:   # the last good state is saved; a script can still tell
        sys.exit(143 if isinstance(e, Terminated) else 130)


if __name__ == "__main__":
    main()
