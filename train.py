"""train.py — convert a dense model into a sparse one: train routers and LoRA, nothing else.

    python train.py --init=checkpoints/smollm2-135m-instruct-f32     # the README recipe
    python train.py --init=resume --out_dir=out                       # continue a run
    torchrun --standalone --nproc_per_node=2 train.py --init=...      # data parallel (DDP; gloo on CPU)
    torchrun --standalone --nproc_per_node=2 train.py --fsdp=True ... # the frozen base sharded (FSDP)

Every default is in the block below and can be overridden as --key=value or --key value; RANGES
below it holds the valid values of every numeric flag.

What one step does:
  teacher = the same weights with LoRA off and the routers off, under no_grad (no second copy);
  student = LoRA on, hard per-token gates, masked path (every sublayer runs, the gate multiplies,
            so each router gets its straight-through gradient);
  loss    = KL(teacher || student) (+ ce * next-token cross-entropy, + l1 * FLOP-weighted L1).
How much is skipped is not left to a loss weight: the routers start fitted to the training-free
"peek" rule at the first target density (fit_routers), and after every step a controller shifts
all router biases by one common amount, so the FLOP-weighted density stays at --target_density
while the KL decides which tokens and which sublayers keep their compute. Several targets
(--target_density=0.95,0.9,0.85) split the run into stages, one per target, each sliding from the
previous one over its first --anneal fraction; every stage but the last leaves a checkpoint in
out_dir/stage<k>/: one run, several operating points.

The baselines and the hybrid (prune.py): --prune=kl|bi|layer --prune_compute=R removes the least
useful sublayers (or ShortGPT's blocks) for every token down to compute ratio R and trains LoRA
alone; with --prune_routed=True the removed ones stay closed and every other sublayer is routed
per token as above.

The run: setup() (model, data windows from data/prepare.py, optimizer), init_routers() (the
peek-rule fit), then train_step() per iteration, held_out() every eval_interval, and a checkpoint
(load_weights.save_checkpoint, all-or-nothing) every save_interval, at the end of every stage and
of the run. Whatever stops a run early (Ctrl-C, SIGTERM, a NaN or infinite loss or gradient, any
error) first saves its last good state, so --init=resume continues it; an interrupted run then
exits with 130 (Ctrl-C) or 143 (SIGTERM), a failed one with 1.

Several processes (torchrun) split each batch. By default each holds the whole model and DDP
averages the gradients (data_parallel); --fsdp=True shards every weight, frozen or trained,
across them instead (shard), for a model that does not fit one device. Checkpoints are the same
either way: the whole routers and LoRA, loadable on one device. (Under FSDP a signal or an error
other than a NaN keeps the last periodic checkpoint instead of saving: can_save_after.)
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import lora
import prune
import router
from configurator import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, Range, check_ranges, overrides
from data.prepare import RandomWindows, load_sources, spread_windows, tokenizer_key
from eval import evaluate_sparse
from flops import compute_ratio, skip_savings
from load_weights import (LIKELY_NONFINITE, CheckpointError, LoadError, NonFiniteError, has_checkpoint, held_as,
                          load, load_checkpoint, read_checkpoint_meta, resolve, save_checkpoint, trained_parameters,
                          trained_state, whole)
from model import softcap

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
    lr=2e-3,                       # LoRA adapters
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
    # sparsity
    target_density=(0.87,),        # FLOP-weighted fraction of routed work to keep (one per stage)
    anneal=0.1,                    # fraction of each later stage over which its target slides down
    density_gain=0.5,              # controller: share of the batch's balancing bias shift applied per step
    flop_weighted=True,            # density weighted by the FLOPs each skip saves
    prune="",                      # remove sublayers for every token, ranked by: kl | bi | layer (prune.py)
    prune_compute=0.9,             # --prune: remove sublayers until the compute ratio is at most this
    prune_scores="",               # --prune: reuse the ranking in an earlier run's prune.json (same base)
    prune_routed=False,            # --prune: route what it keeps per token (a hybrid) instead of keeping it whole
    l1=0.0,                        # weight of an L1 push on sigmoid(z) (0: the controller alone sets the density)
    ce=0.0,                        # weight of next-token cross-entropy (0 = distillation only)
    # bookkeeping
    eval_interval=50,
    save_interval=0,               # iterations between checkpoints; 0 = every eval_interval
    eval_batches=2,
    seed=1337,
    dtype="float32",               # or bfloat16: frozen weights and activations (routers, LoRA, KL stay float32)
    device="cpu",
    grad_checkpoint=False,
    fsdp=False,                    # torchrun: shard the model across the processes instead of copying it
)
RANGES = dict(   # the valid values of every numeric flag (configurator.check_ranges)
    max_iters=AT_LEAST_1, batch_size=AT_LEAST_1, seq_len=Range(2), grad_accum=AT_LEAST_1,
    lr=AT_LEAST_0, router_lr=AT_LEAST_0, warmup_iters=AT_LEAST_0, min_lr_frac=FRACTION, grad_clip=POSITIVE,
    lora_rank=AT_LEAST_0, lora_alpha=POSITIVE, fit_windows=AT_LEAST_1,
    target_density=FRACTION, anneal=FRACTION, density_gain=FRACTION, l1=AT_LEAST_0, ce=AT_LEAST_0,
    prune_compute=Range(0, 1, open_lo=True),
    eval_interval=AT_LEAST_1, save_interval=AT_LEAST_0, eval_batches=AT_LEAST_1, seed=AT_LEAST_0,
)


# ----------------------------------------------------------------------------------------------
# Losses: chunked distillation over the vocabulary
# ----------------------------------------------------------------------------------------------

def chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one (chunk, V) float32 tensor stays near 64 MB."""
    return max(16, (1 << 24) // vocab_size)


def capped_logits(h, weight, cap):
    """(c, d) hidden -> (c, V) float32 logits, soft-capped as the model does."""
    return softcap((h @ weight.t()).float(), cap)


class DistillLoss(torch.autograd.Function):
    """Sums of KL(teacher || student) and of the student's cross-entropy, over the vocabulary in chunks.

    A (tokens, V) tensor never exists: each chunk's logits are made, used, and dropped. The gradient
    with respect to the student's hidden state is known in closed form, dKL/ds = softmax(s) - p_t and
    dCE/ds = softmax(s) - onehot, so it is computed in the same pass and kept as (tokens, d) only;
    backward just scales it. The head weight is frozen (no gradient). (fctx is torch's autograd
    context, not model.py's Context.)
    """

    @staticmethod
    def forward(fctx, h_s, h_t, weight, targets, cap):
        # h_s, h_t: (N, d) student / teacher final hidden; weight: (V, d); targets: (N,) or None
        N = h_s.shape[0]
        grad_kl = torch.zeros(N, h_s.shape[1], dtype=torch.float32, device=h_s.device)
        grad_ce = torch.zeros_like(grad_kl) if targets is not None else None
        kl, ce = h_s.new_zeros((), dtype=torch.float32), h_s.new_zeros((), dtype=torch.float32)
        step = chunk_size(weight.shape[0])
        for i in range(0, N, step):
            s = capped_logits(h_s[i:i + step], weight, cap)                    # (c, V)
            logp_s = torch.log_softmax(s, dim=-1)
            logp_t = torch.log_softmax(capped_logits(h_t[i:i + step], weight, cap), dim=-1)
            p_t = logp_t.exp()
            kl += (p_t * (logp_t - logp_s)).sum()
            d_cap = None if cap is None else 1 - (s / cap) ** 2                 # d capped / d raw
            p_s = logp_s.exp()
            if targets is not None:
                rows = torch.arange(s.shape[0], device=s.device)
                tgt = targets[i:i + step]
                ce -= logp_s[rows, tgt].sum()
                g = p_s.clone()
                g[rows, tgt] -= 1
                grad_ce[i:i + step] = ((g if d_cap is None else g * d_cap).to(weight.dtype) @ weight).float()
            g = p_s - p_t
            grad_kl[i:i + step] = ((g if d_cap is None else g * d_cap).to(weight.dtype) @ weight).float()
        fctx.save_for_backward(grad_kl, grad_ce if grad_ce is not None else grad_kl)
        fctx.has_ce = targets is not None
        fctx.h_dtype = h_s.dtype
        return kl, ce

    @staticmethod
    def backward(fctx, g_kl, g_ce):
        grad_kl, grad_ce = fctx.saved_tensors
        grad = g_kl * grad_kl + (g_ce * grad_ce if fctx.has_ce else 0)
        return grad.to(fctx.h_dtype), None, None, None, None


def distill_losses(model, x, ce_weight: float, student=None):
    """Mean KL and CE per token, the L1 loss, and the gate records for a (B, T) batch x.

    student: what runs the student pass, model itself or its DDP wrapper (whose forward readies
    the gradient all-reduce of backward). The teacher pass has no backward: it runs on the bare
    model, around the wrapper.
    """
    with torch.no_grad(), lora.disabled(model):
        h_t, _ = model(x, routers_off=True, return_hidden=True)           # (B, T, d) teacher
    h_s, records = (student or model)(x, masked=True, return_hidden=True)  # (B, T, d) student
    B, T, d = h_s.shape
    targets = x[:, 1:].reshape(-1) if ce_weight > 0 else None
    # CE needs a next token: with ce > 0 both losses cover the positions that have one (all but
    # the last); with ce = 0 the KL covers every position
    h_s_ce, h_t_ce = (h_s[:, :-1], h_t[:, :-1]) if targets is not None else (h_s, h_t)
    kl, ce = DistillLoss.apply(h_s_ce.reshape(-1, d), h_t_ce.reshape(-1, d), model.head_weight(),
                               targets, model.cfg.final_softcap)
    n = h_s_ce.shape[0] * h_s_ce.shape[1]
    return kl / n, ce / n, records


# ----------------------------------------------------------------------------------------------
# The routers' start: fitted to the peek rule before any training
# ----------------------------------------------------------------------------------------------

def residual_moves(model, x: torch.Tensor) -> dict:
    """{(layer, kind): (inputs (N, d), log(|f(x)| / |h|) (N,))} of every routed sublayer of the
    dense model on tokens x (B, T): what its router sees, and how far the sublayer's output f(x)
    moves the residual stream h. The sink at position 0 is left out."""
    return {key: (inputs[:, 1:].flatten(0, 1).float(), router.log_move(h, y)[:, 1:].flatten())
            for key, (h, inputs, y) in prune.sublayer_io(model, x).items()}


def fit_routers(model, batches, savings: dict, ridge: float = 1e-2):
    """Fit every router, by ridge regression on the dense model, to predict its sublayer's
    log(|f(x)| / |h|) from its input x, minus the log of the FLOPs a skip there saves.

    A router then opens where the training-free peek rule (eval.py --gates=peek) would compute:
    one threshold on "how much the token's stream moves per FLOP" across all sublayers, which also
    decides how much each sublayer skips. Fitted in seconds from forward passes alone (the normal
    equations, (d + 1)^2 numbers per router), it starts training from a reasonable allocation
    instead of every gate open. set_density then picks the common threshold.
    """
    gram, moment = {}, {}
    for x in batches:
        for key, (inputs, target) in residual_moves(model, x).items():
            xa = torch.cat([inputs, torch.ones(len(inputs), 1, device=inputs.device)], 1).double()   # (N, d + 1)
            gram[key] = gram.get(key, 0) + xa.T @ xa
            moment[key] = moment.get(key, 0) + xa.T @ target.double()
    with torch.no_grad():
        for layer, kind, r in router.routers(model):
            A = gram[(layer, kind)]
            penalty = ridge * A.diagonal()[:-1].mean() * torch.eye(len(A), dtype=A.dtype, device=A.device)
            penalty[-1, -1] = 0                                           # the intercept is not shrunk
            w = torch.linalg.solve(A + penalty, moment[(layer, kind)])    # (d + 1,)
            r.proj.weight.copy_(held_as(r.proj.weight, w[:-1][None]))
            r.proj.bias.fill_(float(w[-1]) - math.log(savings[kind]))


def shift_routers(model, step: float, fixed=()):
    """Move every router's threshold by one common step (positive: fewer tokens compute), but
    those of the fixed sublayers."""
    with torch.no_grad():
        for layer, kind, r in router.routers(model):
            if (layer, kind) not in fixed:
                r.proj.bias -= step


@torch.no_grad()
def set_density(model, batches, weights: dict, target: float, tol: float = 2e-3, fixed=()):
    """Shift all routers (but the fixed sublayers') by the one amount that makes their
    FLOP-weighted density on batches `target` (bisection: density falls as the shift grows)."""
    def density():
        stats = router.GateStats()
        for x in batches:
            stats.add(model(x, return_hidden=True)[1])
        return stats.mean(weights=weights)

    lo, hi, moved = -50.0, 50.0, 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        shift_routers(model, mid - moved, fixed)
        moved = mid
        d = density()
        if abs(d - target) <= tol:
            break
        lo, hi = (mid, hi) if d > target else (lo, mid)
    return d


def init_routers(run: "Run"):
    """Fit the routers to the peek rule on --fit_windows training windows, then set their common
    threshold so that the first target density holds there; write out_dir/routers_init.json.
    With --prune, make them the static baseline's constant gates instead (prune_routers)."""
    config, model = run.config, run.model
    windows = run.data.batch(config["fit_windows"]).to(config["device"])     # the same on every rank
    batches = windows.split(config["batch_size"])
    if static(config):
        return prune_routers(run, batches)
    fit_routers(model, batches, run.savings)
    removed = prune_routers(run, batches) if config["prune"] else []     # a hybrid: close those, route the rest
    run.ctrl.fixed = set(removed)                         # closed for good: no shift reopens them
    density = set_density(model, batches, run.weights, config["target_density"][0], fixed=run.ctrl.fixed)
    rows = [dict(layer=l, kind=k, bias=whole(r.proj.bias).item(), weight_norm=whole(r.proj.weight).norm().item())
            for l, k, r in router.routers(model)]                    # every rank: --fsdp gathers them
    if run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "routers_init.json").write_text(json.dumps(dict(density=density, routers=rows), indent=1))


def prune_routers(run: "Run", batches):
    """--prune: rank the sublayers on the fit windows, remove the least harmful ones for every
    token until the compute ratio is --prune_compute (prune.py), freeze the routers so that only
    LoRA trains; write out_dir/prune.json (the scores and what was removed). With --prune_routed
    only the removed sublayers' routers are closed, the others keep their fit and train.
    Returns the removed sublayers."""
    config, model = run.config, run.model
    scores = (prune.read_scores(config["prune_scores"], config["prune"]) if config["prune_scores"]
              else prune.rank(model, batches, config["prune"]))
    window = config["seq_len"] + (run.data.bos is not None)
    removed = prune.removal_set(model.cfg, scores, window, config["prune_compute"])
    if config["prune_routed"]:
        prune.close(model, removed)
    else:
        prune.set_static(model, removed)                  # frozen by build(): AdamW skips them
    if run.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        rows = [dict(layer=l, kind=k, score=v) for (l, k), v in sorted(scores.items(), key=lambda kv: kv[1])]
        ratio = compute_ratio(model.cfg, window, {key: 0.0 for key in removed})
        prune.write_json(run.out_dir / "prune.json", dict(ranking=config["prune"], base=config["base"],
                                                          compute_ratio=ratio, removed=removed, scores=rows))
        print(f"--prune={config['prune']}: removed {len(removed)} sublayers for every token, "
              f"compute ratio {ratio:.3f}")
    return removed


def static(config: dict) -> bool:
    """A static baseline: --prune without --prune_routed (constant gates, no controller)."""
    return bool(config["prune"]) and not config["prune_routed"]


# ----------------------------------------------------------------------------------------------
# The density controller
# ----------------------------------------------------------------------------------------------

class DensityController:
    """Holds the measured FLOP-weighted density at a target by shifting every router's bias by one
    common amount after each step: bias -= gain * s, where s is the shift that would have put this
    step's batch exactly at the target (balancing_shift); gain in [0, 1] damps batch noise.

    A shift of the biases moves the density at once (in the same step), where a loss weight on an
    L1 term moves it only after many Adam steps and so lags, then overshoots (the λ controller this
    replaced oscillated between 0.70 and 0.93 on SmolLM2-135M). Solving for the shift, rather than
    stepping by gain * (density - target), keeps the loop stable however steeply the density
    responds: the proportional step it replaced swung between 0.58 and 0.98 every other step in
    an MLP-only run, whose logits crowd the threshold. The KL alone then decides which tokens and
    which sublayers keep their compute: a router whose sublayer matters more to the KL rises
    against the common shift. In a later stage the target slides from the previous one over the
    stage's first --anneal fraction.
    """

    def __init__(self, targets, stage_iters: int, anneal: float, gain: float):
        self.targets, self.stage_iters, self.gain = list(targets), max(1, stage_iters), gain
        self.anneal_iters = max(1, int(anneal * self.stage_iters))
        self.fixed = set()      # (layer, kind) a hybrid closed for good: counted, never shifted

    def target(self, it: int) -> float:
        stage = min(it // self.stage_iters, len(self.targets) - 1)
        start = self.targets[max(0, stage - 1)]
        frac = min(1.0, (it - stage * self.stage_iters) / self.anneal_iters)
        return start + (self.targets[stage] - start) * frac

    def update(self, model, it: int, records, weights: dict, world: int = 1):
        """Shift the routers after step it, whose gate records (every micro-batch's) are records;
        across processes, by the shift of the whole global batch, so the replicas stay the same."""
        z, share = gate_logits(records, weights, self.fixed)
        if world > 1:
            z, share = gathered(z, world), gathered(share, world)
        shift_routers(model, self.gain * balancing_shift(z, share, self.target(it)), self.fixed)


def gate_logits(records, weights: dict, fixed=()):
    """Every logit of the gate records, flat (N,), and its share of the FLOP-weighted density
    (N,): weights[kind] / (its record's tokens), as in GateStats.mean. The gates of the fixed
    sublayers do not move with a shift: +inf where they keep, -inf where they skip."""
    def logits(r):
        if (r.layer, r.kind) in fixed:
            return torch.where(r.keep, math.inf, -math.inf).flatten()
        return r.z.detach().flatten().float()
    z = torch.cat([logits(r) for r in records])
    share = torch.cat([torch.full((r.z.numel(),), weights[r.kind] / r.z.numel(), dtype=torch.float64,
                                  device=r.z.device) for r in records])
    return z, share


def balancing_shift(z: torch.Tensor, share: torch.Tensor, target: float) -> float:
    """The common bias shift s after which the logits z (N,) would keep the share target of the
    FLOP-weighted density (a token keeps while z > s): a weighted quantile. s falls halfway
    between the last logit kept and the first one dropped."""
    z, order = z.sort(descending=True)
    kept = (share[order] / share.sum()).cumsum(0)          # kept[i]: density when z[0..i] keep
    i = int(torch.searchsorted(kept, kept.new_tensor([target - 1e-9])))
    movable = torch.isfinite(z).nonzero()[:, 0]            # a target out of reach: as near as it gets
    if len(movable) == 0:
        return 0.0
    i = min(max(i, int(movable[0])), int(movable[-1]))
    below = z[i + 1] if i + 1 < len(z) and torch.isfinite(z[i + 1]) else z[i] - 1.0
    return float((z[i] + below) / 2)


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
    progress = max(0, local - (config["warmup_iters"] if it < n else 0)) / max(1, n - config["warmup_iters"])
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config["min_lr_frac"] + (1 - config["min_lr_frac"]) * cosine


FIXED_ON_RESUME = ("lora_rank", "lora_alpha", "lora_targets", "route", "kv",          # what the trained
                   "prune", "prune_compute", "prune_routed")                          # tensors mean


def resumed_config(saved: dict, given: dict, out_dir: str) -> dict:
    """The saved run's config with the command line's changes: each one said, and refused where it
    would change what the checkpoint's tensors are."""
    if "train_config" not in saved:
        raise ValueError(f"the checkpoint in {out_dir} holds no training state: eval.py and sample.py read it, "
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
    return {**DEFAULTS, **old, **given, "base": saved["base"]}


def read_config(argv) -> dict:
    """Defaults, overridden by a resumed run's config, overridden by the command line."""
    given = overrides(DEFAULTS, argv)
    config = dict(DEFAULTS, **given)
    if config["init"] == "resume":
        config = resumed_config(read_checkpoint_meta(config["out_dir"]), given, config["out_dir"])
    else:
        if has_checkpoint(config["out_dir"]):
            raise ValueError(f"{config['out_dir']} already holds a checkpoint (of {read_checkpoint_meta(config['out_dir'])['base']}): "
                             "continue it with --init=resume, or choose another --out_dir")
        config["base"] = config["init"]
    check_ranges(config, RANGES)
    if config["prune"] and config["prune"] not in prune.RANKINGS:
        raise ValueError(f"--prune={config['prune']!r} is not a ranking: choose one of {', '.join(prune.RANKINGS)}")
    if config["prune"] and config["fsdp"]:
        raise ValueError("--prune is not tested under --fsdp: run the static baselines without it (DDP or one process)")
    if config["prune"] and config["route"] != "sublayer":
        raise ValueError("--prune sets one gate per sublayer: use --route=sublayer")
    if static(config) and len(config["target_density"]) > 1:
        raise ValueError("--prune without --prune_routed has no density to stage: give no staged --target_density")
    return config


def lora_targets(config: dict) -> list:
    return [t for t in config["lora_targets"].split(",") if t]


def build(config: dict):
    """The base model with routers and LoRA attached (only those train), its tokenizer and folder."""
    folder = resolve(config["base"])                       # a name may mean a download: once
    model, tok = load(str(folder), config["dtype"], config["device"])
    if config["seq_len"] + tok.adds_bos > model.cfg.max_seq_len:
        raise ValueError(f"--seq_len={config['seq_len']}{' + BOS' if tok.adds_bos else ''} is over the "
                         f"model's context of {model.cfg.max_seq_len}")
    torch.manual_seed(config["seed"])                      # LoRA A init: the same on every rank
    router.add_routers(model, config["route"], config["kv"])
    if config["lora_rank"] > 0:
        lora.inject(model, lora_targets(config), config["lora_rank"], config["lora_alpha"])
    for p in trained_parameters(model).values():
        p.requires_grad_(True)
    for p in router.parameters(model) if static(config) else []:
        p.requires_grad_(False)                            # a static baseline trains LoRA only
    model.grad_checkpoint = config["grad_checkpoint"]
    return model, tok, folder


def make_optimizer(model, config):
    """AdamW with three learning rates: LoRA, router biases, router weights.

    Adam moves every coordinate by about lr per step, so a router weight step shifts the
    logit z = w.x by up to lr * sum|x_i|, i.e. d times more than a bias step. Dividing the
    weights' rate by sqrt(d) keeps a step's effect on z near the bias's: gates then move
    early (the bias) without flipping wholesale from one step to the next (the weights).
    """
    router_w = [r.proj.weight for _, _, r in router.routers(model)]
    router_b = [r.proj.bias for _, _, r in router.routers(model)]
    w_lr = config["router_lr"] / math.sqrt(model.cfg.dim)
    groups = [dict(params=router_w, lr=w_lr, base_lr=w_lr),
              dict(params=router_b, lr=config["router_lr"], base_lr=config["router_lr"]),
              dict(params=lora.parameters(model), lr=config["lr"], base_lr=config["lr"])]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)


def setup_distributed(config):
    """(rank, world size); a torchrun launch starts gloo (CPU) or NCCL (GPU, one per process)."""
    if "RANK" not in os.environ:
        return 0, 1
    if config["device"].startswith("cuda"):
        config["device"] = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(config["device"])
    dist.init_process_group("nccl" if config["device"].startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_mean(values: list, world: int, device="cpu") -> list:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)     # NCCL reduces device tensors only
    dist.all_reduce(t)
    return (t / world).tolist()


def gathered(t: torch.Tensor, world: int) -> torch.Tensor:
    """Every process's t (the same shape on each), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def data_parallel(model, world: int, config: dict):
    """The student pass's module: model itself; over several processes its DDP wrapper, which
    averages the trained gradients across processes during backward; or with --fsdp the model
    itself, sharded in place (shard).

    Only routers and LoRA require gradients, so only they are reduced; every one of them is
    used by every student pass (all routers run on the masked path), so no search for unused
    parameters. No initial broadcast either: every rank built the same model from the same
    files and seed, and fits its routers on the same windows (a resume reads the same checkpoint).
    """
    if world == 1:
        return model
    if config["fsdp"]:
        return shard(model, world, config["device"])
    return DistributedDataParallel(model, init_sync=False)


def shard(model, world: int, device: str):
    """--fsdp: every weight, frozen or trained, split into one shard per process (fully_shard,
    in place); returns the model.

    Each Block is one unit and the root (embeddings, final norm, head) another: a unit's weights
    are gathered whole just before it runs and freed after, so a process holds its shards plus
    about one block at a time (the root's stay whole from the forward to the backward: the loss
    uses the head). Backward reduce-scatters the routers' and LoRA's gradients, and each
    process's AdamW updates its own shard of them. The shards go to the mesh's device: on CUDA,
    the process's GPU, from the host memory the model was loaded into (setup).
    """
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextmanager
def no_sync(student):
    """Backward without the exchange of gradients, which stay with each process until a later
    backward exchanges their sum (the micro-batches before the last one)."""
    if isinstance(student, DistributedDataParallel):
        with student.no_sync():
            yield
        return
    student.set_requires_gradient_sync(False)      # --fsdp
    try:
        yield
    finally:
        student.set_requires_gradient_sync(True)


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
    val = None
    if config["val_data"]:
        val = spread_windows(load_sources(config["val_data"], tok, key), config["seq_len"], bos,
                             config["eval_batches"] * config["batch_size"])
    window = config["seq_len"] + (bos is not None)
    savings = skip_savings(model.cfg, window)
    weights = savings if config["flop_weighted"] else {"attn": 1.0, "mlp": 1.0}
    ctrl = DensityController(config["target_density"], stage_iters(config), config["anneal"], config["density_gain"])
    meta = dict(base=config["base"], model_config=model.cfg.to_dict(),
                lora=dict(rank=config["lora_rank"], alpha=config["lora_alpha"], targets=lora_targets(config)),
                train_config={k: v for k, v in config.items() if k != "base"})
    student = data_parallel(model, world, config)     # before the optimizer: FSDP replaces the parameters
    return Run(config, model, student, data, val, make_optimizer(model, config), ctrl,
               savings, weights, meta,
               rank, world, Path(config["out_dir"]))


def resume(run: Run):
    """Continue from out_dir's checkpoint: weights, optimizer, RNG, controller, data position."""
    state = load_checkpoint(run.out_dir, run.model, run.opt)
    run.start = state["iter"]
    if run.config["prune_routed"]:                        # a hybrid: what it closed stays out of the shifts
        run.ctrl.fixed = prune.read_removed(run.out_dir)
    run.data.gen.set_state(state["data_rng"])


def save(run: Run, it: int, folder: Optional[Path] = None):
    tensors, optim = trained_state(run.model, run.opt)     # on every rank: --fsdp gathers the shards
    if run.rank == 0:
        state = dict(iter=it, data_rng=run.data.gen.get_state())
        save_checkpoint(folder or run.out_dir, tensors, optim, state, run.meta)


def can_save_after(run: Run, e: BaseException) -> bool:
    """Whether a run stopped by e can still save: always in one process or under DDP (rank 0
    holds everything), under --fsdp only after a NaN, which every process meets at the same point.
    After an error or a signal the processes stand at different places, and gathering the shards
    would wait forever: the last periodic checkpoint stands."""
    return run.world == 1 or not run.config["fsdp"] or isinstance(e, NonFiniteError)


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
    """The sparse model against its base on the fixed held-out windows (eval.py's numbers)."""
    res = evaluate_sparse(run.model, run.val, run.config["seq_len"], run.config["batch_size"])
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a scheduler, `kill`): handled like Ctrl-C."""


def on_sigterm(signum, frame):
    raise Terminated


def rng_states(run: Run):
    return torch.get_rng_state(), run.data.gen.get_state()


def forget_step(run: Run, rng_before):
    """Undo a step that stopped before its update: a resume then redraws the same batch."""
    torch.set_rng_state(rng_before[0])
    run.data.gen.set_state(rng_before[1])
    run.opt.zero_grad(set_to_none=True)


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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(rows))
        os.replace(tmp, path)


def stopped_by(e: BaseException) -> str:
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)"
    return "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by {type(e).__name__}"


def train(config: dict):
    run = setup(config)
    if config["init"] != "resume":
        init_routers(run)
    if config["init"] == "resume":
        resume(run)
    master, log = run.rank == 0, None
    if master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        trim_log(run.out_dir / "log.jsonl", run.start)
        log = open(run.out_dir / "log.jsonl", "a")
        n_trained = sum(p.numel() for p in trained_parameters(run.model).values())
        print(f"training {n_trained:,} parameters (routers + LoRA) of a "
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
        if done > saved and not isinstance(e, CheckpointError) and can_save_after(run, e):
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
