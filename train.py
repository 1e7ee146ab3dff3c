"""train.py — convert a dense model into a sparse one: train routers and LoRA, nothing else.

    python train.py --init=checkpoints/smollm2-135m-instruct-f32     # the README recipe
    python train.py --init=resume --out_dir=out                       # continue a run
    torchrun --standalone --nproc_per_node=2 train.py --init=...      # data parallel (gloo on CPU)

Every default is in the block below and can be overridden as --key=value.

What one step does (DESIGN.md):
  teacher = the same weights with LoRA off and every gate open, under no_grad (no second copy);
  student = LoRA on, hard per-token gates, masked path (every sublayer runs, the gate multiplies,
            so each router gets its straight-through gradient);
  loss    = KL(teacher || student) + lambda * L1 (+ ce * next-token cross-entropy).
L1 is the mean of sigmoid(z) over tokens and routed sublayers, weighted by each sublayer's FLOPs
so that the pressure lands where compute is. lambda is not hand-tuned: a controller moves it so the
FLOP-weighted density follows a target that slides from 1.0 down to --target_density over the first
--anneal fraction of the run, then holds it (see DensityController for why). Several targets
(--target_density=0.9,0.8,0.7) split the run into stages, one per target, each sliding from the
previous one; every stage but the last leaves a checkpoint in out_dir/stage<k>/: one run, several
operating points.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import lora
import router
from configurator import configure
from data.prepare import load_sources, tokenizer_key
from eval import evaluate_sparse
from load_weights import CKPT_JSON, CKPT_TENSORS, LoadError, load, read_checkpoint_meta, resolve
from flops import skip_savings
from model import softcap

DEFAULTS = dict(
    init="smollm2-135m-instruct",  # base model: preset name or HF-format folder; "resume" continues out_dir
    data="data/corpus",            # training text: .txt/.jsonl files or folders, comma-separated
    val_data="data/heldout",       # held-out text for the periodic eval ("" = last 5% of each training file)
    out_dir="out",
    # run length and batch
    max_iters=100,
    batch_size=2,
    seq_len=256,
    grad_accum=1,
    # optimizer
    lr=2e-3,                       # LoRA adapters
    router_lr=3e-2,                # router biases (weights: router_lr / sqrt(d)); gates must move early
    warmup_iters=10,
    min_lr_frac=0.1,
    grad_clip=1.0,
    # what is trained
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets="wq,wk,wv,wo,gate,up,down",
    route="sublayer",              # sublayer | attn | mlp | block
    kv="all",                      # all | kept
    router_bias=0.3,               # routers start open (z = +bias for every token), close to the edge
    router_bias_max=4.0,           # ... except sensitive sublayers, which start up to this far from it
    calibrate=True,                # measure each sublayer's sensitivity first and set its bias from it
    # sparsity
    target_density=(0.87,),        # FLOP-weighted fraction of routed work to keep (one per stage); 0 = fixed lambda
    l1=0.05,                       # lambda: the starting value, or the fixed one when target_density=0
    anneal=0.6,                    # fraction of each stage over which its target slides down
    lambda_gain=1.0,               # controller: log(lambda) += gain * (density - target) per step
    flop_weighted=True,            # weight L1 by each sublayer's FLOPs
    ce=0.0,                        # weight of next-token cross-entropy (0 = distillation only)
    # bookkeeping
    eval_interval=50,
    eval_batches=2,
    seed=1337,
    dtype="float32",
    device="cpu",
    grad_checkpoint=False,
)


# ----------------------------------------------------------------------------------------------
# Data: random windows from token memmaps, every source equally likely
# ----------------------------------------------------------------------------------------------

class Windows:
    """Samples (B, T) token windows. Each row picks a source uniformly, then a start.

    A source with few tokens (Python docs) weighs as much as a large one (Shakespeare), so the
    routers do not learn the statistics of one text only. BOS is prepended when the tokenizer's
    post-processor adds one, as it will be at inference.
    """

    def __init__(self, sources: dict, seq_len: int, bos_id, seed: int):
        self.bos = bos_id
        self.span = seq_len - (bos_id is not None)       # text tokens per window
        for name, toks in sources.items():
            if len(toks) <= self.span:
                raise ValueError(f"text {name!r} has {len(toks)} tokens, fewer than one window of "
                                 f"{seq_len}: give more text or lower --seq_len")
        self.sources = list(sources.values())
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        rows = []
        for _ in range(batch_size):
            toks = self.sources[int(torch.randint(len(self.sources), (1,), generator=self.gen))]
            start = int(torch.randint(len(toks) - self.span, (1,), generator=self.gen))
            rows.append(torch.from_numpy(toks[start:start + self.span].astype(np.int64)))
        x = torch.stack(rows)                                                  # (B, span)
        if self.bos is not None:
            x = torch.cat([torch.full((batch_size, 1), self.bos), x], dim=1)
        return x                                                               # (B, seq_len)


def eval_windows(sources: dict, seq_len: int, bos_id, count: int) -> torch.Tensor:
    """`count` fixed windows spread evenly over the held-out sources (the same every eval)."""
    span = seq_len - (bos_id is not None)
    rows = []
    for toks in sources.values():
        n = max(1, count // len(sources))
        starts = np.linspace(0, len(toks) - span - 1, n).astype(int)
        rows += [torch.from_numpy(toks[s:s + span].astype(np.int64)) for s in starts]
    x = torch.stack(rows)
    if bos_id is not None:
        x = torch.cat([torch.full((len(rows), 1), bos_id), x], dim=1)
    return x


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
    backward just scales it. The head weight is frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, h_s, h_t, weight, targets, cap):
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
        ctx.save_for_backward(grad_kl, grad_ce if grad_ce is not None else grad_kl)
        ctx.has_ce = targets is not None
        ctx.h_dtype = h_s.dtype
        return kl, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        grad_kl, grad_ce = ctx.saved_tensors
        grad = g_kl * grad_kl + (g_ce * grad_ce if ctx.has_ce else 0)
        return grad.to(ctx.h_dtype), None, None, None, None


def distill_losses(model, x, ce_weight: float):
    """Mean KL and CE per token, the L1 loss, and the gate records for a (B, T) batch x."""
    with torch.no_grad(), lora.disabled(model):
        h_t, _ = model(x, routers_off=True, return_hidden=True)                     # (B, T, d) teacher
    h_s, records = model(x, masked=True, return_hidden=True)                  # (B, T, d) student
    B, T, d = h_s.shape
    targets = x[:, 1:].reshape(-1) if ce_weight > 0 else None
    # KL on every position; CE on positions that have a next token
    h_s_ce, h_t_ce = (h_s[:, :-1], h_t[:, :-1]) if targets is not None else (h_s, h_t)
    kl, ce = DistillLoss.apply(h_s_ce.reshape(-1, d), h_t_ce.reshape(-1, d), model.head_weight(),
                               targets, model.cfg.final_softcap)
    n = h_s_ce.shape[0] * h_s_ce.shape[1]
    return kl / n, ce / n, records


@torch.no_grad()
def sensitivity(model, x: torch.Tensor) -> dict:
    """{(layer, kind): KL(dense || dense with that one sublayer skipped for every token)} on x.

    A few sublayers carry the model (in SmolLM2-135M: layer 0's MLP, layer 1's attention, the
    last MLPs); skipping a fifth of the tokens there costs more than skipping every other
    sublayer at that rate together. Measured before training, one forward per sublayer.
    """
    ref = torch.log_softmax(model(x, routers_off=True)[0].float(), -1)
    out = {}
    for layer, kind, _ in router.routers(model):
        with router.forced(model, {(layer, kind): 0.0}):          # this sublayer: every gate closed
            logp = torch.log_softmax(model(x)[0].float(), -1)
        out[(layer, kind)] = (ref.exp() * (ref - logp)).sum(-1).mean().item()
    return out


def calibrate_biases(model, sens: dict, bias: float, bias_max: float):
    """Start each router at bias * (its sensitivity / the median one), clipped to [bias, bias_max].

    Adam moves every bias by about the same step whatever its gradient, so without this the L1
    push closes the few vital sublayers as early as the many cheap ones, and the KL explodes
    before the routers can learn which is which. Every gate still starts open (KL = 0).
    """
    median = float(np.median(list(sens.values())))
    with torch.no_grad():
        for layer, kind, r in router.routers(model):
            ratio = sens[(layer, kind)] / max(median, 1e-12)
            r.proj.bias.fill_(min(bias_max, bias * max(1.0, ratio)))


class DensityController:
    """Moves lambda so the measured density follows a target sliding from 1.0 to the final one.

    A fixed lambda either does nothing or collapses the gates, depending on the model; a controller
    that aims at the final target from step 0 overshoots, because gates answer lambda with a lag of
    many steps. Sliding the target down slowly keeps the tracking error small, and correcting
    log(lambda) in proportion to the error lets lambda fall as fast as it rose.
    """

    def __init__(self, targets, stage_iters: int, anneal: float, lam: float, gain: float):
        self.targets, self.stage_iters, self.gain = list(targets), max(1, stage_iters), gain
        self.anneal_iters = max(1, int(anneal * self.stage_iters))
        self.log_lam = math.log(lam)

    @property
    def lam(self) -> float:
        return math.exp(self.log_lam)

    def target(self, it: int) -> float:
        stage = min(it // self.stage_iters, len(self.targets) - 1)
        start = 1.0 if stage == 0 else self.targets[stage - 1]
        frac = min(1.0, (it - stage * self.stage_iters) / self.anneal_iters)
        return start + (self.targets[stage] - start) * frac

    def update(self, it: int, density: float):
        self.log_lam += self.gain * (density - self.target(it))
        self.log_lam = min(max(self.log_lam, math.log(1e-4)), math.log(1e3))


# ----------------------------------------------------------------------------------------------
# Checkpoints: only what was trained, as safetensors + JSON; written atomically
# ----------------------------------------------------------------------------------------------

def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def write_atomic(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, model, opt, state: dict, meta: dict):
    """trained.safetensors (routers + LoRA), optim.safetensors (AdamW moments, RNG), ckpt.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    it = str(state["iter"])
    tensors = {n: p.detach().contiguous() for n, p in trainable(model).items()}
    write_atomic(out_dir / CKPT_TENSORS, lambda f: save_file(tensors, str(f), metadata={"iter": it}))
    names = {p: n for n, p in trainable(model).items()}
    optim = {"rng.torch": torch.get_rng_state(), "rng.data": state.pop("data_rng")}
    for p, s in opt.state.items():
        for k, v in s.items():
            optim[f"{names[p]}.{k}"] = v.detach().reshape(-1) if k == "step" else v.detach().contiguous()
    write_atomic(out_dir / "optim.safetensors", lambda f: save_file(optim, str(f), metadata={"iter": it}))
    meta = dict(meta, train_state=state)
    write_atomic(out_dir / CKPT_JSON, lambda f: f.write_text(json.dumps(meta, indent=1)))


def load_checkpoint_state(out_dir: Path, model, opt) -> dict:
    """Restore trained tensors, AdamW moments and RNG; return the JSON training state."""
    meta = read_checkpoint_meta(out_dir)
    state = meta["train_state"]
    tensors = load_file(str(out_dir / CKPT_TENSORS))
    optim = load_file(str(out_dir / "optim.safetensors"))
    params = trainable(model)
    if set(tensors) != set(params):
        raise LoadError(f"{out_dir}/{CKPT_TENSORS} does not hold this run's trained tensors: "
                        "the checkpoint was written by a different configuration")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    for n, p in params.items():
        if f"{n}.exp_avg" in optim:
            opt.state[p] = {"step": optim[f"{n}.step"].reshape(()), "exp_avg": optim[f"{n}.exp_avg"],
                            "exp_avg_sq": optim[f"{n}.exp_avg_sq"]}
    torch.set_rng_state(optim["rng.torch"])
    state["data_rng"] = optim["rng.data"]
    return state


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

def stage_iters(cfg: dict) -> int:
    return max(1, cfg["max_iters"] // len(cfg["target_density"]))


def lr_at(it: int, cfg: dict) -> float:
    """Multiplier of the base learning rates: linear warmup, then cosine down to min_lr_frac
    within each stage (a warm restart when the next target begins)."""
    if it < cfg["warmup_iters"]:
        return (it + 1) / cfg["warmup_iters"]
    n = stage_iters(cfg)
    local = it % n if it < n * len(cfg["target_density"]) else it - n * (len(cfg["target_density"]) - 1)
    progress = max(0, local - (cfg["warmup_iters"] if it < n else 0)) / max(1, n - cfg["warmup_iters"])
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * cosine


def read_config(argv) -> dict:
    """Defaults, overridden by a resumed run's config, overridden by the command line."""
    cfg = configure(DEFAULTS, argv)
    if cfg["init"] == "resume":
        saved = read_checkpoint_meta(cfg["out_dir"])
        given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")} - {"init"}
        cfg = dict(saved["train_config"], **{k: cfg[k] for k in given}, init="resume")
        cfg["base"] = saved["base"]
    else:
        existing = Path(cfg["out_dir"]) / CKPT_JSON
        if existing.exists():
            raise ValueError(f"{cfg['out_dir']} already holds a checkpoint (of {read_checkpoint_meta(cfg['out_dir'])['base']}): "
                             "continue it with --init=resume, or choose another --out_dir")
        cfg["base"] = cfg["init"]
    return cfg


def build(cfg: dict):
    """The base model with routers and LoRA attached (only those train), and its folder."""
    folder = resolve(cfg["base"])                       # a name may mean a download: once
    model, tok = load(str(folder), cfg["dtype"], cfg["device"])
    if cfg["seq_len"] > model.cfg.max_seq_len:
        raise ValueError(f"--seq_len={cfg['seq_len']} is over the model's context of {model.cfg.max_seq_len}")
    torch.manual_seed(cfg["seed"])                      # LoRA A init: the same on every rank
    router.add_routers(model, cfg["route"], cfg["kv"], cfg["router_bias"])
    targets = [t for t in cfg["lora_targets"].split(",") if t]
    if cfg["lora_rank"] > 0:
        lora.inject(model, targets, cfg["lora_rank"], cfg["lora_alpha"])
    for n, p in model.named_parameters():
        p.requires_grad_("_router." in n or n.endswith((".A", ".B")))
    model.grad_checkpoint = cfg["grad_checkpoint"]
    lora_spec = dict(rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], targets=targets)
    return model, tok, lora_spec, folder


def make_optimizer(model, cfg):
    """AdamW with three learning rates: LoRA, router biases, router weights.

    Adam moves every coordinate by about lr per step, so a router weight step shifts the
    logit z = w.x by up to lr * sum|x_i|, i.e. d times more than a bias step. Dividing the
    weights' rate by sqrt(d) keeps a step's effect on z near the bias's: gates then move
    early (the bias) without flipping wholesale from one step to the next (the weights).
    """
    params = trainable(model)
    router_w = [p for n, p in params.items() if "_router." in n and n.endswith("weight")]
    router_b = [p for n, p in params.items() if "_router." in n and n.endswith("bias")]
    adapters = [p for n, p in params.items() if "_router." not in n]
    w_lr = cfg["router_lr"] / math.sqrt(model.cfg.dim)
    groups = [dict(params=router_w, lr=w_lr, base_lr=w_lr),
              dict(params=router_b, lr=cfg["router_lr"], base_lr=cfg["router_lr"]),
              dict(params=adapters, lr=cfg["lr"], base_lr=cfg["lr"])]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)


def setup_distributed(cfg):
    """(rank, world size); a torchrun launch starts gloo (CPU) or NCCL (GPU)."""
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_mean(values: list, world: int) -> list:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world).tolist()


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def train(cfg: dict):
    rank, world = setup_distributed(cfg)
    master = rank == 0
    out_dir = Path(cfg["out_dir"])
    model, tok, lora_spec, folder = build(cfg)
    mcfg = model.cfg
    tkey = tokenizer_key(folder)
    bos = tok.bos_id if tok.adds_bos else None
    data = Windows(load_sources(cfg["data"], tok, tkey), cfg["seq_len"], bos, cfg["seed"])
    if cfg["val_data"]:
        val_windows = eval_windows(load_sources(cfg["val_data"], tok, tkey), cfg["seq_len"], bos,
                                   cfg["eval_batches"] * cfg["batch_size"])
    else:
        val_windows = None
    opt = make_optimizer(model, cfg)
    weights = skip_savings(mcfg, cfg["seq_len"]) if cfg["flop_weighted"] else {"attn": 1.0, "mlp": 1.0}
    controlled = any(cfg["target_density"])
    ctrl = DensityController(cfg["target_density"] if controlled else [1.0], stage_iters(cfg), cfg["anneal"],
                             cfg["l1"], cfg["lambda_gain"])
    start = 0
    if cfg["calibrate"] and cfg["init"] != "resume":
        sens = sensitivity(model, data.batch(1).to(cfg["device"]))
        calibrate_biases(model, sens, cfg["router_bias"], cfg["router_bias_max"])
        if master:
            out_dir.mkdir(parents=True, exist_ok=True)
            biases = {(l, k): r.proj.bias.item() for l, k, r in router.routers(model)}
            rows = [dict(layer=l, kind=k, kl=v, bias=biases[(l, k)]) for (l, k), v in sens.items()]
            (out_dir / "sensitivity.json").write_text(json.dumps(rows, indent=1))
    if cfg["init"] == "resume":
        state = load_checkpoint_state(out_dir, model, opt)
        start, ctrl.log_lam = state["iter"], state["log_lambda"]
        data.gen.set_state(state["data_rng"])
    meta = dict(base=cfg["base"], model_config=mcfg.to_dict(), lora=lora_spec,
                train_config={k: v for k, v in cfg.items() if k != "base"})
    log = None
    params = list(trainable(model).values())
    tokens_per_iter = cfg["batch_size"] * cfg["seq_len"] * cfg["grad_accum"] * world

    def checkpoint(it, folder=out_dir):
        if master:
            save_checkpoint(folder, model, opt, dict(iter=it, log_lambda=ctrl.log_lam,
                                                     data_rng=data.gen.get_state()), meta)

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "log.jsonl", "a")
        print(f"training {sum(p.numel() for p in params):,} parameters (routers + LoRA) of a "
              f"{sum(p.numel() for p in model.parameters()):,}-parameter model; {tokens_per_iter} tokens/iter")
    bar = tqdm(range(start, cfg["max_iters"]), initial=start, total=cfg["max_iters"], disable=not master)
    done = start                                          # iterations completed
    try:
        for it in bar:
            t0 = time.time()
            rng_before = (torch.get_rng_state(), data.gen.get_state())
            scale = lr_at(it, cfg)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            kl_sum = ce_sum = l1_sum = dens = 0.0
            for _ in range(cfg["grad_accum"]):
                x = data.batch(cfg["batch_size"] * world)[rank * cfg["batch_size"]:(rank + 1) * cfg["batch_size"]]
                kl, ce, records = distill_losses(model, x.to(cfg["device"]), cfg["ce"])
                l1 = router.l1_loss(records, weights)
                loss = kl + ctrl.lam * l1 + cfg["ce"] * ce
                (loss / cfg["grad_accum"]).backward()
                kl_sum += kl.item() / cfg["grad_accum"]
                ce_sum += ce.item() / cfg["grad_accum"]
                l1_sum += l1.item() / cfg["grad_accum"]
                dens += router.GateStats(records).mean(weights=weights) / cfg["grad_accum"]
            if world > 1:   # average the few trainable gradients ourselves: no DDP wrapper needed
                for p in params:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            kl_sum, ce_sum, l1_sum, dens = all_reduce_mean([kl_sum, ce_sum, l1_sum, dens], world)
            if controlled:
                ctrl.update(it, dens)
            done = it + 1
            dt = time.time() - t0
            row = dict(iter=it, kl=kl_sum, ce=ce_sum, l1=l1_sum, density=dens, target=ctrl.target(it),
                       lam=ctrl.lam, lr_scale=scale, tok_s=tokens_per_iter / dt)
            if master:
                bar.set_postfix(kl=f"{kl_sum:.4f}", dens=f"{dens:.3f}", tgt=f"{ctrl.target(it):.3f}",
                                lam=f"{ctrl.lam:.3g}", tok_s=f"{tokens_per_iter / dt:.0f}")
                last = it + 1 == cfg["max_iters"]
                if val_windows is not None and ((it + 1) % cfg["eval_interval"] == 0 or last):
                    res = evaluate_sparse(model, val_windows, cfg["seq_len"], cfg["batch_size"])
                    row.update(val_kl=res["kl_to_dense"], val_ppl=res["perplexity"],
                               dense_ppl=res["dense_perplexity"], top1=res["top1_agreement"],
                               **{k: res[k] for k in ("density_attn", "density_mlp", "compute_ratio")})
                    tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith(("val", "dense", "top1", "density_", "compute"))))
                log.write(json.dumps(row) + "\n")
                log.flush()
            stage = done // ctrl.stage_iters
            if done % ctrl.stage_iters == 0 and stage < len(ctrl.targets):   # a stage ends: keep it
                checkpoint(done, out_dir / f"stage{stage}")
    except KeyboardInterrupt:
        if done == it:   # stopped inside a step: forget it, so that a resume redraws the same batch
            torch.set_rng_state(rng_before[0])
            data.gen.set_state(rng_before[1])
            opt.zero_grad(set_to_none=True)
        if master:
            tqdm.write(f"interrupted: saving iteration {done} to {out_dir} (continue with --init=resume)")
    checkpoint(done)
    if master:
        print(f"saved {out_dir}/{CKPT_JSON} at iteration {done}")
    if world > 1:
        dist.destroy_process_group()
    return model


def main():
    try:
        train(read_config(sys.argv[1:]))
    except (LoadError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
