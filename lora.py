"""lora.py — low-rank adapters on frozen linear layers, written out by hand.

    y = W x + (alpha / r) * B(A(dropout(x)))      A: (r, in), B: (out, r)

A starts kaiming-uniform and B at zero, so an injected model is exactly the base model.
The teacher pass of train.py turns every adapter off (`disabled(model)`): the same weights
then give the dense model, with no second copy in memory.

    inject(model, targets=("wq", "wv"), rank=16, alpha=32)   # in place
    with disabled(model): ...                                  # base model
    merge(model)                                               # fold B A into W for inference
    parameters(model)                                          # only the adapter tensors (A, B)
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

# Projections a target name may pick (module names in model.py).
TARGETS = ("wq", "wk", "wv", "wo", "gate", "up", "down")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.scale = alpha / rank
        device = base.weight.device
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))   # what nn.Linear does for its own weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        y = self.base(x)                                          # (..., out)
        if not self.enabled or self.merged:
            return y
        # adapters train in float32 whatever the base dtype; the update joins in y's dtype
        update = self.dropout(x).to(self.A.dtype) @ self.A.t() @ self.B.t()
        return y + (self.scale * update).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """W += scale * B A, after which the adapter costs nothing."""
        if not self.merged:
            delta = (self.B.float() @ self.A.float()) * self.scale
            self.base.weight += delta.to(self.base.weight.dtype)
            self.merged = True


def inject(model, targets=("wq", "wv"), rank: int = 16, alpha: float = 32.0, dropout: float = 0.0):
    """Wrap every projection named in targets, in every layer, with a LoRALinear."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name in targets:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    setattr(parent, name, LoRALinear(base, rank, alpha, dropout))
    return model


def adapters(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def disabled(model):
    """Run the base model: every adapter off inside the block, restored after (not after
    merge(): the update is then in the weights)."""
    mods = adapters(model)
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def merge(model):
    for m in adapters(model):
        m.merge()
    return model


def named_parameters(model) -> dict:
    """{name in the model's state dict: tensor} of every adapter's A and B."""
    return {f"{name}.{ab}": getattr(m, ab) for name, m in model.named_modules() if isinstance(m, LoRALinear)
            for ab in ("A", "B")}


def parameters(model) -> list:
    """Every adapter's A and B: what train.py trains besides the routers."""
    return list(named_parameters(model).values())
