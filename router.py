"""router.py — the per-token gates that decide, at every sublayer, compute or skip.

For a sublayer s of layer l with normalized input x = norm_s(h):

    z = router(x)                 # Linear(d, 1) with bias: one logit per token
    g = 1[z > 0]                  # hard gate in the forward pass
    dg/dz := sigmoid'(z)          # straight-through estimator in the backward pass
    h = h + g * f_s(x)

This file holds the router module, the straight-through gate, the L1 sparsity
loss, gate statistics, and the token-compaction helpers that turn a gate
pattern into real savings: gather the kept rows, run the sublayer on them
only, scatter the result back.

Routers start open (weight 0, bias +3): the routed model is then exactly the
dense model. `add_routers(model, route, kv)` attaches them to a loaded model.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTES = ("sublayer", "attn", "mlp", "block")  # what gets its own gate
KV_MODES = ("all", "kept")                     # what a skipped token leaves in the attention


class Router(nn.Module):
    """One logit per token from the sublayer's normalized input.

    mode "learned": z = w·x + b (float32, whatever the activation dtype).
    mode "random":  z ~ U(density - 1, density], so P(z > 0) = self.density — the baseline gates.
    """

    def __init__(self, dim: int, bias_init: float = 3.0):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        self.bias_init = bias_init
        self.mode = "learned"
        self.density = 1.0
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
            return -torch.empty(B, T, device=x.device).uniform_(-self.density, 1 - self.density)
        w, b = self.proj.weight.float(), self.proj.bias.float()           # (1, d), (1,)
        return F.linear(x.reshape(B * T, d).float(), w, b).view(B, T)     # 2-D input: one addmm


def hard_gate(z: torch.Tensor) -> torch.Tensor:
    """1[z > 0] in the forward pass, sigmoid'(z) as its gradient (straight-through)."""
    soft = torch.sigmoid(z)
    hard = (z > 0).to(z.dtype)
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


def add_routers(model, route: str = "sublayer", kv: str = "all", bias_init: float = 3.0):
    """Attach open routers to every block of a loaded model (in place) and return it."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}: choose one of {', '.join(ROUTES)}")
    if kv not in KV_MODES:
        raise ValueError(f"unknown kv mode {kv!r}: choose one of {', '.join(KV_MODES)}")
    model.cfg.route, model.cfg.kv = route, kv
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


# ----------------------------------------------------------------------------------------------
# Token compaction
# ----------------------------------------------------------------------------------------------

@dataclass
class Packing:
    """Where the kept tokens of a (B, T) gate pattern go in a padded (B, Tp) layout.

    Kept token n sits at (b_idx[n], t_idx[n]) in the original layout and at
    (b_idx[n], slot[n]) in the packed one; Tp = the largest per-sequence count.
    `flat` = b_idx * T + t_idx, the row of the token in a (B*T, d) view.
    """
    b_idx: torch.Tensor   # (N,)
    t_idx: torch.Tensor   # (N,)
    slot: torch.Tensor    # (N,)
    counts: torch.Tensor  # (B,) kept tokens per sequence
    flat: torch.Tensor    # (N,)
    width: int            # Tp
    sizes: list           # counts as Python ints

    @property
    def even(self) -> bool:
        """Every sequence keeps as many tokens: no padding, the kept rows already are the layout."""
        return min(self.sizes, default=0) == self.width

    @property
    def valid(self) -> torch.Tensor:
        """(B, Tp) bool: which packed slots hold a real token."""
        return torch.arange(self.width, device=self.counts.device) < self.counts[:, None]


def pack(keep: torch.Tensor) -> Packing:
    """Index the kept tokens of a (B, T) bool pattern (row-major: sequence, then position)."""
    B, T = keep.shape
    counts = keep.sum(1)
    sizes = counts.tolist()                                    # one device sync
    b_idx, t_idx = keep.nonzero(as_tuple=True)
    slot = (keep.cumsum(1) - 1)[b_idx, t_idx]
    return Packing(b_idx, t_idx, slot, counts, b_idx * T + t_idx, max(sizes, default=0), sizes)


def to_packed(rows: torch.Tensor, p: Packing, B: int) -> torch.Tensor:
    """(N, ...) kept rows -> (B, Tp, ...) zero-padded per sequence."""
    if p.even:                                                 # sequence-major rows: a reshape
        return rows.reshape((B, p.width) + rows.shape[1:])
    out = rows.new_zeros((B, p.width) + rows.shape[1:])
    out[p.b_idx, p.slot] = rows
    return out


def from_packed(packed: torch.Tensor, p: Packing) -> torch.Tensor:
    """(B, Tp, ...) -> (N, ...) the real rows, in the order of p."""
    if p.even:
        return packed.reshape((-1,) + packed.shape[2:])
    return packed[p.b_idx, p.slot]


def scatter_add_rows(h: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h (B, T, d) with rows (N, d) added at the flat row indices; out of place."""
    B, T, d = h.shape
    return h.reshape(B * T, d).index_add(0, flat, rows.to(h.dtype)).view(B, T, d)


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


def gate_stats(records) -> dict:
    """Density (fraction of kept slots) per layer and kind, and overall per kind."""
    per = {}
    for r in records:
        per[(r.layer, r.kind)] = r.keep.float().mean().item()
    out = {"per_layer": per}
    for kind in ("attn", "mlp"):
        vals = [v for (l, k), v in per.items() if k == kind]
        out[kind] = sum(vals) / len(vals) if vals else 1.0
    return out
