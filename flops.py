"""flops.py — the FLOP model: what a token costs, dense and sparse, and the compute ratio.

    compute_ratio(cfg, seq_len, density)   # executed FLOPs per token / dense FLOPs per token

The compute ratio is the honest "how much cheaper" number that evaluate.py, bench.py, sample.py
and train.py report: it counts the LM head, the K/V projections per the kv mode, the routers,
and the attention scores at the real context length — not just the skipped sublayers.
tests/test_flops.py checks it against torch's FlopCounterMode and against the visible
(query, key) pairs counted one by one.

`cfg` is a model.ModelConfig; this file imports nothing of the project.
"""
import math
from typing import Optional

import torch


def sublayer_flops(cfg, context: float) -> dict:
    """FLOPs per token (2 per multiply-add) of each part of one layer and of the LM head.

    context: average number of keys a query sees (e.g. (T + 1) / 2 in causal prefill of T).
    Returns {"q_o": .., "kv": .., "scores": .., "mlp": .., "head": .., "router": .., "substitute": ..};
    scores counts q·k and the weighted sum of v, over the visible keys; substitute, what a skipped
    token's router.Substitute costs (its two rank-r matmuls; 0 for none or the mean alone).
    """
    d, H, Hkv, D, F_ = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    rank = getattr(cfg, "substitute", None) or 0
    return dict(q_o=2 * 2 * d * H * D, kv=2 * 2 * d * Hkv * D, scores=2 * 2 * H * D * context,
                mlp=2 * 3 * d * F_, head=2 * d * cfg.vocab_size, router=2 * d, substitute=2 * 2 * d * rank)


def visible_keys(cfg, layer: int, seq_len: int, queries: Optional[int] = None) -> float:
    """Average number of keys (itself included) a query sees in causal attention over seq_len
    tokens, when the queries are the last `queries` positions (None: all of them, a prefill;
    1: the next token of a decoding step)."""
    window = cfg.sliding_window if cfg.layer_type(layer) == "sliding" else None
    queries = seq_len if queries is None else queries
    t = torch.arange(seq_len - queries + 1, seq_len + 1, dtype=torch.float64)
    return float((t if window is None else t.clamp(max=window)).mean())


def compute_ratio(cfg, seq_len: int, density=None, kv: Optional[str] = None,
                  queries: Optional[int] = None) -> float:
    """Executed FLOPs per token / dense FLOPs per token.

    density: {(layer, "attn"|"mlp"): fraction kept}, e.g. router.GateStats.density();
    missing entries count as 1 (not routed: no router, always computed).
    seq_len, queries: the context, as in visible_keys (decoding n tokens after a prompt of P:
    seq_len=P + n, queries=n).
    With kv="all" a skipped token still projects K and V, and a kept query sees every key.
    With kv="kept" a skipped token does neither, and a kept query sees itself plus, of its
    c - 1 other keys, the kept share of the other tokens: 1 + (c - 1) * (aT - 1) / (T - 1)
    keys instead of c (exact for a causal prefill of T tokens of which aT are kept).
    """
    kv = kv or cfg.kv
    density = density or {}
    dense = sparse = 0.0
    for layer in range(cfg.n_layers):
        c = visible_keys(cfg, layer, seq_len, queries)
        f = sublayer_flops(cfg, c)
        a, m = density.get((layer, "attn")), density.get((layer, "mlp"))
        dense += f["q_o"] + f["kv"] + f["scores"] + f["mlp"]
        a_ = 1.0 if a is None else a
        kv_cost = f["kv"] * (a_ if kv == "kept" else 1.0)
        others = max(a_ * seq_len - 1, 0) / (seq_len - 1) if seq_len > 1 else 0.0
        seen = (1 + others * (c - 1)) / c if kv == "kept" else 1.0     # share of the keys a kept query sees
        score_cost = f["scores"] * a_ * seen
        sparse += f["q_o"] * a_ + kv_cost + score_cost + f["mlp"] * (1.0 if m is None else m)
        sparse += f["substitute"] * sum(1 - share for share in (a, m) if share is not None)   # the skipped
        n_routers = (a is not None) + (m is not None)
        sparse += f["router"] * (min(n_routers, 1) if cfg.route == "block" else n_routers)  # block: one router
    head = sublayer_flops(cfg, 1)["head"]
    return (sparse + head) / (dense + head)


def skip_savings(cfg, seq_len: int) -> dict:
    """FLOPs one token saves by skipping an attention and an MLP sublayer (averaged over layers),
    net of its substitute: the weights of train.py's FLOP-weighted L1 and density."""
    layers = range(cfg.n_layers)
    scores = sum(sublayer_flops(cfg, visible_keys(cfg, l, seq_len))["scores"] for l in layers) / cfg.n_layers
    f = sublayer_flops(cfg, 0)
    attn = f["q_o"] + scores + (f["kv"] if cfg.kv == "kept" else 0)
    if f["substitute"] >= min(attn, f["mlp"]):
        raise ValueError(f"a rank-{cfg.substitute} skip substitute costs as many FLOPs as the skip of an "
                         f"{'attention' if attn < f['mlp'] else 'MLP'} saves: use --substitute below "
                         f"{math.ceil(min(attn, f['mlp']) / (f['substitute'] / cfg.substitute))}")
    return {"attn": attn - f["substitute"], "mlp": f["mlp"] - f["substitute"]}
