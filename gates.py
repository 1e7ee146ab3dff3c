"""gates.py — the training-free baselines' gates, forced onto a routed model from outside.

A learned router's decisions mean something only beside decisions that need no training. Inside
`forced`, a model's gates are one of these instead of its routers':

    with forced(model, 0.5): ...         # random gates: each token computes with probability 0.5
    with forced(model, "open"): ...      # every routed sublayer computes (LoRA alone)
    with forced(model, peek_gates(model, t, savings)): ...   # the peek rule (below)
    with forced(model, {(layer, kind): any of these}): ...   # per sublayer; others keep their router

The model's code does not know about them: `forced` swaps each block's routers for the length
of the block, for a RandomGate (a module whose logit is a coin flip: router.decide runs it like
a router) or for None (no router: every token computes), and puts them back after, even on error.

The peek rule (keep a token iff |f(x) - s(x)| / |h|, what a skip loses, per FLOP it saves is
above one global threshold; s the skip substitute, or 0) decides from the sublayer's own output
f(x), so it computes every sublayer and saves nothing: it is the reference for how good
per-token decisions can be before any training. Its sublayers run with no router, and forward
hooks on the model's modules apply it: the input of a sublayer's norm is h, its output x, the
output of its post-norm y = f(x), which the hook replaces by s(x) (or 0) for a skipped token and
records as a router.GateRecord; the model's returned records include them. A
skipped token's K/V stay in the attention (kv="all" semantics, whatever the model's kv mode).

    peek_threshold(model, chunks, seq_len, 0.9)    # the peek table at compute ratio 0.9
    with gates_as(model, chunks, seq_len, "random") as path: ...   # evaluate.py --gates
    evaluate_sparse(model, chunks, seq_len, gates="random")        # scoring.compare_dense under them

Imported by evaluate.py, bench.py, export.py and research/: never by the model, router,
train.py or sample.py.
"""
import contextlib
import inspect
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

import lora
import router
import scoring
from flops import compute_ratio, skip_savings


class RandomGate(nn.Module):
    """A router's stand-in whose logit is random: z ~ -U[-density, 1 - density), so P(z > 0) =
    density (1 keeps every token, 0 none); sinks are still pinned by router.decide."""

    def __init__(self, density: float):
        super().__init__()
        self.density = density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape                                                # x (B, T, d) -> z (B, T)
        return torch.empty(B, T, device=x.device).uniform_(-self.density, 1 - self.density).neg_()


@contextmanager
def forced(model, gates):
    """Force the model's gates inside the block (see the top of this file); its routers are
    restored after, even on error.

    gates: "open"            every routed sublayer computes for every token (routers not run);
           a number d        random gates: each token computes with probability d;
           ("peek", t)       the peek rule with log threshold t (see peek_gates);
           {(layer, kind): any of these}   per sublayer; routers not named keep deciding.
    """
    table = gates if isinstance(gates, dict) else {(l, k): gates for l, k, _ in router.routers(model)}
    modes = {key: _forced_mode(g) for key, g in table.items()}              # check all before changing any
    saved = [(block, block.attn_router, block.mlp_router) for block in model.layers]
    peek, hooks = {}, []
    try:
        for layer, kind, _ in router.routers(model):
            if (layer, kind) in modes:
                mode, value = modes[(layer, kind)]
                setattr(model.layers[layer], f"{kind}_router", RandomGate(value) if mode == "random" else None)
                if mode == "peek":
                    peek[(layer, kind)] = value
        if peek:
            hooks = peek_hooks(model, peek)
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for block, attn_router, mlp_router in saved:
            block.attn_router, block.mlp_router = attn_router, mlp_router


def _forced_mode(g):
    """("open" | "random" | "peek", its number) for one entry of forced()'s gates."""
    if isinstance(g, str) and g == "open":
        return "open", None
    if isinstance(g, tuple) and len(g) == 2 and g[0] == "peek" and isinstance(g[1], (int, float)):
        return "peek", float(g[1])
    if isinstance(g, (int, float)) and 0 <= g <= 1:
        return "random", float(g)
    raise ValueError(f"cannot force gates to {g!r}: use 'open', a density in [0, 1] or ('peek', threshold)")


def peek_hooks(model, thresholds: dict) -> list:
    """Forward hooks that apply the peek rule to the sublayers in thresholds {(layer, kind): t}
    (their routers removed by forced): keep a token iff log(|y - s(x)| / |h|) > t, sinks always,
    with s the sublayer's skip substitute (none: 0); the output y of a skipped token becomes
    s(x), and the decisions join the model's gate records.
    A "block" route's one decision, made on the attention, gates its MLP too. Returns the handles."""
    call, found, hooks = {}, [], []
    signature = inspect.signature(model.forward)

    def start(module, args, kwargs):                # the model's call: its sinks, or no gates at all
        bound = signature.bind(*args, **kwargs).arguments
        cache, idx = bound.get("cache"), bound["idx"]
        call["off"] = bound.get("routers_off", False)
        call["sink"] = None if call["off"] else router.sink_tokens(idx, cache.seen if cache is not None else 0, model.cfg)
        found.clear()

    def finish(module, args, kwargs, out):          # the records of this call join the model's
        return out[0], out[1] + found

    def residual(key):                              # h, the norm's input, and x, its output
        return lambda module, args, x: call.__setitem__(key, (args[0], x))

    def decide(layer, kind, threshold, shared, skip):
        def hook(module, args, y):
            if call["off"]:
                return y
            h, x = call[(layer, kind)]
            s = None if skip is None else skip(x)   # what a skip adds instead of y (none: 0)
            if shared:                              # a "block" route: the attention's decision
                z, keep = found[-1].z, found[-1].keep
            else:
                z = router.log_move(h, y if s is None else y - s) - threshold   # (B, T) what a skip loses
                if call["sink"] is not None:
                    z = z.masked_fill(call["sink"], router.SINK_LOGIT)
                keep = z > router.ZERO
            found.append(router.GateRecord(layer, kind, z, keep))
            return keep.to(y.dtype)[..., None] * y if s is None else torch.where(keep[..., None], y, s)
        return hook

    hooks.append(model.register_forward_pre_hook(start, with_kwargs=True))
    hooks.append(model.register_forward_hook(finish, with_kwargs=True))
    for (layer, kind), threshold in thresholds.items():
        block = model.layers[layer]
        kinds = ("attn", "mlp") if model.cfg.route == "block" else (kind,)
        for k in kinds:
            norm, post = (block.attn_norm, block.attn_post_norm) if k == "attn" else (block.mlp_norm, block.mlp_post_norm)
            hooks.append(norm.register_forward_hook(residual((layer, k))))
            hooks.append(post.register_forward_hook(decide(layer, k, threshold, k != kind, getattr(block, f"{k}_skip"))))
    return hooks


PEEK = ("peek", "peek_lora")    # the peek rule on the base weights, and on the trained ones (LoRA on)


def peek_gates(model, log_threshold: float, savings: dict) -> dict:
    """forced()'s table for the peek rule with one global threshold: a token computes a sublayer
    iff |f(x) - s(x)| / |h| per FLOP that skipping it would save is above exp(log_threshold).

    savings: {"attn": FLOPs, "mlp": FLOPs} a skip saves (flops.skip_savings), so one threshold
    spends compute where it moves the residual stream most per FLOP.
    """
    return {(l, k): ("peek", log_threshold + math.log(savings[k])) for l, k, _ in router.routers(model)}


def peek_threshold(model, chunks, seq_len, target: float, batch_size=4, tol=0.004, adapters=False) -> dict:
    """forced()'s table of peek gates whose compute ratio on chunks is target +- tol.

    The compute ratio falls as the global log threshold rises; regula falsi (Illinois) finds it
    in a few passes, each a masked forward over the windows with the base weights (adapters:
    with the LoRA adapters on, as --gates=peek_lora runs).
    """
    savings = skip_savings(model.cfg, seq_len)

    def excess(t):                                       # compute ratio at threshold t, minus target
        with forced(model, peek_gates(model, t, savings)), adapters_off(model, not adapters):
            stats = scoring.gate_stats(model, chunks, batch_size, "masked", f"peek threshold {t:.2f}")
            return compute_ratio(model.cfg, seq_len, stats.density()) - target

    lo, hi = -40.0, 10.0                                 # every token computes / only the sinks do
    f_lo, f_hi = excess(lo), excess(hi)
    if f_lo < 0 or f_hi > 0:
        raise ValueError(f"--target_compute={target} is outside what peek gates reach on this text "
                         f"({f_hi + target:.3f} to {f_lo + target:.3f})")
    side = 0
    for _ in range(40):
        t = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)      # where the chord crosses zero
        f = excess(t)
        if abs(f) <= tol:
            return peek_gates(model, t, savings)
        if f > 0:
            lo, f_lo = t, f
            f_hi, side = (f_hi / 2, 1) if side == 1 else (f_hi, 1)     # Illinois: halve the stale end
        else:
            hi, f_hi = t, f
            f_lo, side = (f_lo / 2, -1) if side == -1 else (f_lo, -1)
    raise ValueError(f"no peek threshold reaches --target_compute={target} within {tol}")


@contextmanager
def gates_as(model, chunks, seq_len, gates="learned", path="compact", batch_size=4, seed=1337, target_compute=0.9):
    """Inside the block the model's gates are as --gates says (see evaluate.py's docstring); yields
    the path to run them on (peek gates decide from f(x): masked). chunks (N, L): the windows on
    which random gates measure the learned densities and peek gates choose their threshold."""
    table = {} if gates == "learned" else gates
    if gates == "random":
        # the densities the learned routers show on this text, then coin flips at those rates
        table = scoring.gate_stats(model, chunks, batch_size, path).density()
    if gates in PEEK:
        table = peek_threshold(model, chunks, seq_len, target_compute, batch_size, adapters=gates == "peek_lora")
        path = "masked"
    torch.manual_seed(seed)
    with forced(model, table), adapters_off(model, gates == "peek"):
        yield path


def adapters_off(model, off: bool):
    """lora.disabled(model) when off, else a block that changes nothing."""
    return lora.disabled(model) if off else contextlib.nullcontext()


def evaluate_sparse(model, chunks, seq_len, batch_size=4, path="compact", gates="learned", seed=1337,
                    target_compute=0.9) -> dict:
    """The sparse model against its base model on the same windows (see evaluate.py's docstring)."""
    with gates_as(model, chunks, seq_len, gates, path, batch_size, seed, target_compute) as path:
        return scoring.compare_dense(model, chunks, seq_len, batch_size, path)
