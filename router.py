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
SINK_LOGIT whatever the mode: kept in both forward paths, in decoding, under random gates, and
counted as computed by the statistics and the FLOP model; sigmoid'(SINK_LOGIT) ~ 0 gives their
router no gradient.

    add_routers(model, route, kv)       # attach open routers to a loaded model (in place)
    decide(r, x, layer, kind)           # where a sublayer's input becomes its gates
    decide_token(r, x, layer, kinds, records)   # the same rule for the one token of a decoding step
    with forced(model, 0.5): ...        # random gates keeping half the tokens; "open": all compute
    with forced(model, peek_gates(model, tau, costs)): ...   # the training-free reference rule
    parameters(model)                   # what train.py trains of the routers
    l1_loss(records), GateStats(records).density()   # the sparsity loss and the statistics

Density, everywhere in this repository: the density of a sublayer is the fraction of its
(token) slots that computed, kept / slots, counted over the forward passes you give it. A
sublayer without a router always computes (density 1). An average over sublayers weighs each
sublayer equally (or by a weight per kind, e.g. the FLOPs a skip saves).
"""
import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTES = ("sublayer", "attn", "mlp", "block")  # what gets its own gate
KV_MODES = ("all", "kept")                     # what a skipped token leaves in the attention
ZERO = torch.zeros(())   # gates compare with a tensor: a Python 0 would be wrapped in one per call
SINK_LOGIT = 30.0        # the logit of a token that always computes: sigmoid = 1, sigmoid' ~ 1e-13


class Router(nn.Module):
    """One logit per token from the sublayer's normalized input.

    mode "learned": z = w·x + b (float32, whatever the activation dtype).
    mode "random":  z ~ U(density - 1, density], so P(z > 0) = self.density — the baseline gates.
    mode "open":    the router is not run and every token computes (see decide).
    mode "peek":    the router is not run; the gate is decided from the sublayer's own output
                    (see peek_decide): the training-free reference, which saves nothing.
    Set modes with `forced`, which restores them afterwards.
    """

    def __init__(self, dim: int, bias_init: float = 3.0):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        self.bias_init = bias_init
        self.mode = "learned"
        self.density = 1.0         # mode "random": the share of tokens kept
        self.threshold = 0.0       # mode "peek": keep iff log(|f(x)| / |h|) > threshold
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, d) -> z: (B, T) float32
        # One fused op each: while decoding, a router runs per token and sublayer, and its cost
        # is the fixed cost of an op (wrapping a Python number in a tensor would add another).
        B, T, d = x.shape
        if self.mode == "random":   # -U[-density, 1 - density): density 1 keeps all, 0 none
            return torch.empty(B, T, device=x.device).uniform_(-self.density, 1 - self.density).neg_()
        w, b = self.proj.weight.float(), self.proj.bias.float()           # (1, d), (1,)
        if B * T == 1:   # a decoding step of batch 1: a matrix-vector product, the same number
            return torch.addmv(b, w, x.view(d).float()).view(1, 1)
        return F.linear(x.reshape(B * T, d).float(), w, b).view(B, T)     # 2-D input: one addmm


def hard_gate(z: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1[z > 0] (or the decision keep, when a rule in `decide` overrode z) in the forward pass,
    sigmoid'(z) as its gradient (straight-through)."""
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
    threshold: float = 0.0   # peek gates only: see peek_decide

    def last(self) -> "GateRecord":
        """The decisions of the last position only: (B, 1)."""
        return GateRecord(self.layer, self.kind, self.z[:, -1:], self.keep[:, -1:])


def decide(r: Optional[Router], x: torch.Tensor, layer: int, kind: str,
           routers_off: bool = False, sink: Optional[torch.Tensor] = None,
           masked: bool = False) -> Optional[GateRecord]:
    """The gates of one sublayer for its normalized input x (B, T, d).

    None means every token computes: no router here, routers off for this call
    (Model.forward(routers_off=True)), or the router forced open. sink (B, T) bool, or None when
    the call has none: tokens that always compute (position 0, BOS; see the top of this file).
    A peek gate is decided later, from the sublayer's output (peek_decide), so only on the
    masked path, which computes that output for every token.
    """
    if r is None or routers_off or r.mode == "open":
        return None
    if r.mode == "peek":
        if not masked:
            raise ValueError("peek gates decide from the sublayer's output: run them on the masked "
                             "path (Model.forward(masked=True), eval.py --path=masked)")
        return GateRecord(layer, kind, None, sink, r.threshold)
    z = r(x)                                                             # (B, T)
    if sink is not None:
        z = z.masked_fill(sink, SINK_LOGIT)
    return GateRecord(layer, kind, z, z > ZERO)


def decide_token(r: Optional[Router], x: torch.Tensor, layer: int, kinds: tuple, records: list,
                 routers_off: bool = False, sink: Optional[torch.Tensor] = None) -> bool:
    """decide() for the one token x (1, 1, d) of a decoding step of batch 1: whether it computes,
    as a Python bool, with one record per kind in kinds appended to records (a "block" route
    records its one gate as "attn" and "mlp"). The same logit and rule as decide(), and nothing
    around them: at one token every op and Python call costs its fixed overhead (several µs
    between a step's matmuls, which evict the interpreter's code and data from the caches), and
    a step decides twice per layer."""
    if r is None or routers_off or r.mode == "open":
        return True
    if r.mode == "peek":
        return decide(r, x, layer, kinds[0])                             # raises: peek needs the masked path
    z = r.forward(x)       # (1, 1); not r(x): a router has no hooks, and __call__ costs as much as its op
    if sink is not None:
        z = z.masked_fill(sink, SINK_LOGIT)
    kept = z.item() > 0                                                  # the one read (a device sync on a GPU)
    keep = token_keep(kept, z.device)
    for kind in kinds:
        records.append(GateRecord(layer, kind, z, keep))
    return kept


_TOKEN_KEEP = {}   # (kept, device) -> (1, 1) bool tensor


def token_keep(kept: bool, device) -> torch.Tensor:
    """The (1, 1) keep tensor of a one-token decision: made once per value and device, so that a
    decoding step records its decisions without an op. Shared: read it, never write to it."""
    key = (kept, device)
    if key not in _TOKEN_KEEP:
        _TOKEN_KEEP[key] = torch.full((1, 1), kept, device=device)
    return _TOKEN_KEEP[key]


def sink_tokens(idx, start: int, cfg):
    """(B, T) bool: the attention sinks among tokens idx (B, T) starting at position start —
    position 0 and every BOS token — which compute every sublayer; None when there are none
    (or the model has no routers, or cfg.sinks is off)."""
    if cfg.route == "none" or not cfg.sinks or (start > 0 and cfg.bos_id is None):
        return None                                      # nothing to check: no tensor, no device sync
    sink = idx == cfg.bos_id if cfg.bos_id is not None else torch.zeros_like(idx, dtype=torch.bool)
    if start == 0:
        sink[:, 0] = True
    return sink if bool(sink.any()) else None


def log_move(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(|y| / |h|) per token (B, T), in float32: how far a sublayer's output y (B, T, d) moves
    the residual stream h (B, T, d). The peek rule thresholds it; train.fit_routers regresses on it."""
    return y.float().norm(dim=-1).log() - h.float().norm(dim=-1).log()


def peek_decide(g: GateRecord, h: torch.Tensor, y: torch.Tensor):
    """Fill in a peek gate from the residual h (B, T, d) and the sublayer's output y (B, T, d).

    The rule: keep a token iff |y| / |h| — how much the sublayer would move its residual stream —
    is above the sublayer's threshold (peek_gates sets one global threshold on that ratio per
    FLOP the sublayer costs). It needs f(x) to decide, so it saves nothing: it is the reference
    for how good per-token decisions can be before any training.
    """
    z = log_move(h, y) - g.threshold                                     # (B, T)
    if g.keep is not None:                                               # the sinks
        z = z.masked_fill(g.keep, SINK_LOGIT)
    g.z, g.keep = z, z > ZERO


def add_routers(model, route: str = "sublayer", kv: str = "all", bias_init: float = 3.0, sinks: bool = True):
    """Attach open routers to every block of a loaded model (in place) and return it.
    sinks=False lets position 0 and BOS skip like any token (for ablations and tests)."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}: choose one of {', '.join(ROUTES)}")
    if kv not in KV_MODES:
        raise ValueError(f"unknown kv mode {kv!r}: choose one of {', '.join(KV_MODES)}")
    model.cfg.route, model.cfg.kv, model.cfg.sinks = route, kv, sinks
    device = model.tok_emb.weight.device
    for block in model.layers:
        block.attn_router = Router(model.cfg.dim, bias_init).to(device) if route in ("sublayer", "attn", "block") else None
        block.mlp_router = Router(model.cfg.dim, bias_init).to(device) if route in ("sublayer", "mlp") else None
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


def named_parameters(model) -> dict:
    """{name in the model's state dict: parameter} of every router."""
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, Router)
            for p_name, p in m.named_parameters()}


def parameters(model) -> list:
    """Every router parameter (weights and biases)."""
    return list(named_parameters(model).values())


@contextmanager
def forced(model, gates):
    """Force the routers' gates inside the block; their modes are restored after, even on error.

    gates: "open"            every routed sublayer computes for every token (routers not run);
           a number d        random gates: each token computes with probability d;
           ("peek", t)       peek gates with threshold t (see peek_decide, peek_gates);
           {(layer, kind): any of these}   per sublayer; routers not named keep their mode.
    """
    table = gates if isinstance(gates, dict) else {(l, k): gates for l, k, _ in routers(model)}
    modes = {key: _forced_mode(g) for key, g in table.items()}              # check all before changing any
    saved = [(r, r.mode, r.density, r.threshold) for _, _, r in routers(model)]
    try:
        for layer, kind, r in routers(model):
            if (layer, kind) in modes:
                r.mode, r.density, r.threshold = modes[(layer, kind)]
        yield model
    finally:
        for r, mode, density, threshold in saved:
            r.mode, r.density, r.threshold = mode, density, threshold


def _forced_mode(g):
    """(Router.mode, Router.density, Router.threshold) for one entry of forced()'s gates."""
    if isinstance(g, str) and g == "open":
        return "open", 1.0, 0.0
    if isinstance(g, tuple) and len(g) == 2 and g[0] == "peek" and isinstance(g[1], (int, float)):
        return "peek", 1.0, float(g[1])
    if isinstance(g, (int, float)) and 0 <= g <= 1:
        return "random", float(g), 0.0
    raise ValueError(f"cannot force gates to {g!r}: use 'open', a density in [0, 1] or ('peek', threshold)")


def peek_gates(model, log_threshold: float, savings: dict) -> dict:
    """forced()'s table for the peek rule with one global threshold: a token computes a sublayer
    iff |f(x)| / |h| per FLOP that skipping it would save is above exp(log_threshold).

    savings: {"attn": FLOPs, "mlp": FLOPs} a skip saves (flops.skip_savings), so one threshold
    spends compute where it moves the residual stream most per FLOP.
    """
    return {(l, k): ("peek", log_threshold + math.log(savings[k])) for l, k, _ in routers(model)}


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
