"""router.py — the per-token gates that decide, at every sublayer, compute or skip.

For a sublayer s of layer l with normalized input x = norm_s(h):

    z = router(x)                 # Linear(d, 1) with bias: one logit per token
    g = 1[z > 0]                  # hard gate in the forward pass
    dg/dz := sigmoid'(z)          # straight-through estimator in the backward pass
    h = h + g * f_s(x)

Routers start open (weight 0, bias +3): the routed model is then exactly the dense model.
A token's gate depends only on its own hidden state, so training, prefill and token-by-token
decoding make the same decisions.

Attention sinks always compute. Every later token attends heavily to the first one (and to a
BOS token wherever it stands); skipping a sublayer there costs far more than anywhere else (in
SmolLM2-135M, learned gates at compute ratio 0.92 gave 3.7x the dense perplexity when position
0 could skip and 1.6x when it could not). So `decide` pins the logit of those tokens to
SINK_LOGIT: kept in both forward paths and in decoding, and counted as computed by the
statistics and the FLOP model; sigmoid'(SINK_LOGIT) ~ 0 gives their router no gradient.

    add_routers(model, route, kv)       # attach open routers to a loaded model (in place)
    add_routers(model, substitute=32)   # ... and what a skip adds instead of 0: a rank-32 map of x
    decide(r, x, layer, kind)           # where a sublayer's input becomes its gates
    parameters(model)                   # every router and substitute parameter
    l1_loss(records), GateStats(records).density()   # the sparsity loss and the statistics

This file knows only the learned router. The training-free baselines (random gates, the peek
rule) force decisions from outside the model: gates.py.

Density, everywhere in this repository: the density of a sublayer is the fraction of its
(token) slots that computed, kept / slots, counted over the forward passes you give it. A
sublayer without a router always computes (density 1). An average over sublayers weighs each
sublayer equally (or by a weight per kind, e.g. the FLOPs a skip saves).
"""
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTES = ("sublayer", "attn", "mlp", "block")  # what gets its own gate
KV_MODES = ("all", "kept")                     # what a skipped token leaves in the attention
ZERO = torch.zeros(())   # gates compare with a tensor: a Python 0 would be wrapped in one per call
SINK_LOGIT = 30.0        # the logit of a token that always computes: sigmoid = 1, sigmoid' ~ 1e-13


class Substitute(nn.Module):
    """What a token that skips a sublayer adds instead of 0 (the paper): h = h + g·f(x) + (1 - g)·s(x),
    s(x) = b + (x A) B, fitted by least squares to f(x) (controller.fit_substitutes), then b and A
    trained with the routers (B stays: train.make_optimizer); rank 0 is the mean output b alone. Much of
    a sublayer's output is predictable from its input: a skip loses the rest, for 4·d·r FLOPs."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))                               # b (d,)
        self.down = nn.Parameter(torch.zeros(dim, rank)) if rank else None       # A (d, r)
        self.up = nn.Parameter(torch.zeros(rank, dim)) if rank else None         # B (r, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., d) -> s(x) (..., d)
        s = self.bias if self.down is None else x.float() @ self.down @ self.up + self.bias
        return s.expand(x.shape).to(x.dtype)


class Router(nn.Module):
    """One logit per token from the sublayer's normalized input: z = w·x + b, in float32
    whatever the activation dtype."""

    def __init__(self, dim: int, bias_init: float = 3.0):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        self.bias_init = bias_init
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d) -> z: (B, T) float32
        # One fused op each: while decoding, a router runs per token and sublayer, and its cost
        # is the fixed cost of an op (wrapping a Python number in a tensor would add another).
        B, T, d = x.shape
        w, b = self.proj.weight.float(), self.proj.bias.float()           # (1, d), (1,)
        if B * T == 1:   # a decoding step of batch 1: a matrix-vector product, the same number
            return torch.addmv(b, w, x.view(d).float()).view(1, 1)
        return F.linear(x.reshape(B * T, d).float(), w, b).view(B, T)     # 2-D input: one addmm


def hard_gate(z: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1[z > 0] (or the decision keep, when given) in the forward pass, sigmoid'(z) as its
    gradient (straight-through)."""
    soft = torch.sigmoid(z)
    hard = (z > 0 if keep is None else keep).to(z.dtype)
    # (soft - soft.detach()) is exactly 0, so the gate is exactly 0 or 1; hard + soft - soft
    # would round (1 + s) first and give 1 +- 6e-8 for most z
    return hard + (soft - soft.detach())


@dataclass
class GateRecord:
    """What one routed sublayer decided for a batch: its logits and its gates."""
    layer: int
    kind: str            # "attn" or "mlp" (a "block" gate is recorded as "attn" and "mlp")
    z: torch.Tensor      # (B, T) router logits
    keep: torch.Tensor   # (B, T) bool

    def last(self) -> "GateRecord":
        """The decisions of the last position only: (B, 1)."""
        return GateRecord(self.layer, self.kind, self.z[:, -1:], self.keep[:, -1:])


def decide(r: Optional[nn.Module], x: torch.Tensor, layer: int, kind: str,
           routers_off: bool = False, sink: Optional[torch.Tensor] = None) -> Optional[GateRecord]:
    """The gates of one sublayer for its normalized input x (B, T, d).

    None means every token computes: no router here, or routers off for this call
    (Model.forward(routers_off=True)). sink (B, T) bool, or None when the call has none: tokens
    that always compute (position 0, BOS; see the top of this file).
    """
    if r is None or routers_off:
        return None
    z = r(x)                                                             # (B, T)
    if sink is not None:
        z = z.masked_fill(sink, SINK_LOGIT)
    return GateRecord(layer, kind, z, z > ZERO)


def sink_tokens(idx, start: int, cfg):
    """(B, T) bool: the attention sinks among tokens idx (B, T) starting at position start —
    position 0 and every BOS token — which compute every sublayer; None when there are none
    (or the model has no routers, or cfg.sinks is off)."""
    if cfg.route == "none" or not cfg.sinks or (start > 0 and cfg.bos_id is None):
        return None                                      # nothing to check: no tensor, no device sync
    sink = idx == cfg.bos_id if cfg.bos_id is not None else torch.zeros_like(idx, dtype=torch.bool)
    if start == 0:
        sink[:, 0] = True
    return sink if start == 0 or bool(sink.any()) else None   # at 0 there is one: no read back


def log_move(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(|y| / |h|) per token (B, T), in float32: how far a sublayer's output y (B, T, d) moves
    the residual stream h (B, T, d). controller.fit_routers regresses on it; gates.py's peek rule
    thresholds it."""
    return y.float().norm(dim=-1).log() - h.float().norm(dim=-1).log()


def add_routers(model, route: str = "sublayer", kv: str = "all", bias_init: float = 3.0, sinks: bool = True,
                substitute: Optional[int] = None):
    """Attach open routers to every block of a loaded model (in place) and return it.
    sinks=False lets position 0 and BOS skip like any token (for ablations and tests).
    substitute: what a skipped token adds (Substitute): None = 0, 0 = a mean, r = rank r."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}: choose one of {', '.join(ROUTES)}")
    if kv not in KV_MODES:
        raise ValueError(f"unknown kv mode {kv!r}: choose one of {', '.join(KV_MODES)}")
    if substitute is not None and not (isinstance(substitute, int) and 0 <= substitute <= model.cfg.dim):
        raise ValueError(f"substitute={substitute!r}: use None (a skip adds 0), 0 (the sublayer's mean output) "
                         f"or a rank from 1 to {model.cfg.dim} (the model's width)")
    model.cfg.route, model.cfg.kv, model.cfg.sinks, model.cfg.substitute = route, kv, sinks, substitute
    device, d = model.tok_emb.weight.device, model.cfg.dim
    for block in model.layers:
        for kind, routed in (("attn", route in ("sublayer", "attn", "block")), ("mlp", route in ("sublayer", "mlp"))):
            setattr(block, f"{kind}_router", Router(d, bias_init).to(device) if routed else None)
            gated = routed or (kind == "mlp" and route == "block")             # a block's MLP follows its gate
            sub = Substitute(d, substitute).to(device) if gated and substitute is not None else None
            setattr(block, f"{kind}_skip", sub)
    return model


def routers(model):
    """(layer, kind, Router) for every router in the model."""
    out = []
    for i, block in enumerate(model.layers):
        for kind in ("attn", "mlp"):
            r = getattr(block, f"{kind}_router", None)
            if r is not None:
                out.append((i, kind, r))
    return out


def substitutes(model):
    """(layer, kind, Substitute) for every skip substitute in the model."""
    return [(i, kind, getattr(block, f"{kind}_skip")) for i, block in enumerate(model.layers)
            for kind in ("attn", "mlp") if getattr(block, f"{kind}_skip", None) is not None]


def named_parameters(model) -> dict:
    """{name in the model's state dict: parameter} of every router and skip substitute."""
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, (Router, Substitute))
            for p_name, p in m.named_parameters()}


def parameters(model) -> list:
    """Every router and substitute parameter."""
    return list(named_parameters(model).values())


# ----------------------------------------------------------------------------------------------
# Sparsity loss and statistics
# ----------------------------------------------------------------------------------------------

def l1_loss(records, weights=None) -> torch.Tensor:
    """Mean over tokens and routed sublayers of sigmoid(z), optionally weighted per sublayer kind.

    weights: {"attn": w_a, "mlp": w_m} (e.g. each kind's share of the FLOPs); None = uniform.
    """
    total, norm = 0.0, 0.0
    for r in records:
        w = 1.0 if weights is None else weights[r.kind]
        total = total + w * torch.sigmoid(r.z).mean()
        norm += w
    return total / norm


class GateStats:
    """Gate decisions counted per routed sublayer, over any number of forward passes.

        stats = GateStats(records)          # or GateStats() and stats.add(records) per batch
        stats.density()                     # {(layer, kind): kept / slots}, routed sublayers
        stats.mean("attn")                  # average over routed attention sublayers
        stats.mean(n_layers=L)              # average over all 2L sublayers, unrouted ones at 1
        stats.mean(weights=w)               # weighted by w[kind], e.g. the FLOPs a skip saves
    """

    def __init__(self, records=()):
        self.kept, self.slots = defaultdict(int), defaultdict(int)
        self.add(records)

    def add(self, records) -> "GateStats":
        for r in records:
            self.kept[(r.layer, r.kind)] += int(r.keep.sum())
            self.slots[(r.layer, r.kind)] += r.keep.numel()
        return self

    def density(self) -> dict:
        """{(layer, kind): fraction of its slots that computed} for every routed sublayer seen."""
        return {key: self.kept[key] / self.slots[key] for key in self.slots}

    def per_layer(self, n_layers: int) -> list:
        """[{"layer": i, "attn": density, "mlp": density}] for every layer; unrouted sublayers at 1."""
        d = self.density()
        return [{"layer": i, "attn": d.get((i, "attn"), 1.0), "mlp": d.get((i, "mlp"), 1.0)}
                for i in range(n_layers)]

    def mean(self, kind: Optional[str] = None, n_layers: Optional[int] = None, weights=None) -> float:
        """Average density over the routed sublayers (of one kind, if given), or with n_layers
        over all the model's sublayers with unrouted ones at 1; 1 when there are none."""
        if n_layers is None:
            values = list(self.density().items())
        else:
            values = [((row["layer"], k), row[k]) for row in self.per_layer(n_layers) for k in ("attn", "mlp")]
        values = [(k, d) for (_, k), d in values if kind in (None, k)]
        if not values:
            return 1.0
        w = {"attn": 1.0, "mlp": 1.0} if weights is None else weights
        return sum(w[k] * d for k, d in values) / sum(w[k] for k, _ in values)
