"""The FLOP model (flops.sublayer_flops, visible_keys, compute_ratio) against a direct count.

    python -m pytest tests/test_flops.py -q

What is compared, on tiny models with forced gates (batch 2, both sequences keeping as
many tokens, so the packed layout has no padding):
- every matrix multiply of a linear layer — q/k/v/o projections, the MLP, the routers and
  the LM head — counted by torch.utils.flop_counter.FlopCounterMode around a compacted
  forward, per module, must equal the model's per-token FLOPs times the tokens that really
  ran that part (K/V for every token in kv="all", for kept tokens only in kv="kept");
- attention scores apart, because what a kernel does is not what the model counts: the
  fused CPU kernel is not counted by FlopCounterMode at all, and a masked kernel computes
  the whole (queries x keys) rectangle, hidden pairs included. The model counts the
  visible (query, key) pairs, so those are enumerated from the gates and positions and
  compared with visible_keys; the soft-capped (explicit) path's matmuls are checked to
  be the rectangle it is given (trimmed to the keys the queries can reach), 4·H·D per pair;
- compute_ratio, against the ratio of the two direct counts (linear FLOPs counted +
  4·H·D per visible pair), sparse over dense: exact on a model without windows when the
  gate pattern is symmetric in time (the model assumes kept queries sit, on average, in
  the middle of the sequence), and within 1% with sliding windows and random gates.
"""
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: model.py, router.py

import router
from flops import compute_ratio, skip_savings, sublayer_flops, visible_keys
from conftest import TINY as LLAMA
from model import Model, ModelConfig, attention_mask
# soft-capped attention runs as explicit matmuls, which FlopCounterMode does count
GEMMA2 = dict(LLAMA, norm_offset=True, act="gelu_tanh", embed_scale=True, sandwich_norm=True, query_scale=8.0,
              attn_softcap=2.0, final_softcap=5.0, sliding_window=5, layer_types=("sliding", "full"))
FAMILIES = {"llama": LLAMA, "gemma2": GEMMA2}
B, T = 2, 24


class TableRouter(router.Router):
    """A real router (so that its FLOPs are spent and counted) whose decision is overruled
    by a (B, T) table: logit +1 where the table keeps the token, -1 where it skips it."""

    def __init__(self, dim, keep):
        super().__init__(dim)
        self.keep = keep

    def forward(self, x):
        super().forward(x)
        return torch.where(self.keep, 1.0, -1.0)


def gate_tables(n_layers, density, symmetric, seed=0):
    """{(layer, kind): (B, T) bool}, every sequence keeping round(density * T) tokens.

    symmetric: position t is kept iff T - 1 - t is (kept queries centred in the sequence)."""
    g = torch.Generator().manual_seed(seed)
    tables = {}
    for layer in range(n_layers):
        for kind in ("attn", "mlp"):
            rows = []
            for _ in range(B):
                if symmetric:
                    half = torch.zeros(T // 2, dtype=torch.bool)
                    half[torch.randperm(T // 2, generator=g)[: round(density * T / 2)]] = True
                    rows.append(torch.cat([half, half.flip(0)]))
                else:
                    row = torch.zeros(T, dtype=torch.bool)
                    row[torch.randperm(T, generator=g)[: round(density * T)]] = True
                    rows.append(row)
            tables[(layer, kind)] = torch.stack(rows)
    return tables


def model_with_gates(family, kv, tables):
    torch.manual_seed(0)
    model = Model(ModelConfig(**FAMILIES[family])).eval()
    router.add_routers(model, "sublayer", kv, sinks=False)             # the tables say who computes
    for layer, kind, _ in router.routers(model):
        setattr(model.layers[layer], f"{kind}_router", TableRouter(model.cfg.dim, tables[(layer, kind)]))
    return model


# module (under Model.layers.N) -> the FLOP model's part
PARTS = {"attn.wq": "q_o", "attn.wo": "q_o", "attn.wk": "kv", "attn.wv": "kv", "mlp": "mlp",
         "attn_router": "router", "mlp_router": "router"}
LAYER_MODULE = re.compile(r"Model\.layers\.(\d+)\.(.+)$")


def counted_flops(model, idx, dense=False):
    """FlopCounterMode totals: {(layer, part): flops, "head": flops, "scores": flops}."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx, routers_off=dense)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    out = defaultdict(int)
    for name, flops in counts.items():
        m = LAYER_MODULE.match(name)
        if m and m.group(2) in PARTS:
            out[(int(m.group(1)), PARTS[m.group(2)])] += flops
    layers = [f"Model.layers.{l}" for l in range(model.cfg.n_layers)]
    out["head"] = counts["Model"] - sum(counts.get(n, 0) for n in layers)   # the model's own matmul
    # what the layers do outside their linear modules: explicit attention matmuls
    out["scores"] = sum(counts.get(n, 0) for n in layers) - sum(v for k, v in out.items() if k != "head")
    return out


def predicted_linear_flops(cfg, kv, tables, dense=False):
    """What the FLOP model says the linear layers cost, from the tokens that ran each part."""
    f = sublayer_flops(cfg, 1.0)
    out = defaultdict(int)
    for layer in range(cfg.n_layers):
        attn = B * T if dense else int(tables[(layer, "attn")].sum())
        out[(layer, "q_o")] = f["q_o"] * attn
        out[(layer, "kv")] = f["kv"] * (attn if kv == "kept" else B * T)
        out[(layer, "mlp")] = f["mlp"] * (B * T if dense else int(tables[(layer, "mlp")].sum()))
        if not dense:
            out[(layer, "router")] = 2 * f["router"] * B * T
    out["head"] = f["head"] * B * T
    return out


def visible_pairs(cfg, layer, kv, keep):
    """(query, key) pairs the attention of one layer really needs, from positions and gates."""
    pos = torch.arange(T).expand(B, T)
    window = cfg.sliding_window if cfg.layer_type(layer) == "sliding" else None
    mask = attention_mask(pos, pos, window)[:, 0]                     # (B, T, T)
    if keep is None:
        return int(mask.sum())
    mask = mask & keep[:, :, None]                                    # only kept tokens ask
    if kv == "kept":
        mask = mask & keep[:, None, :]                                # ... and only they answer
    return int(mask.sum())


def tokens():
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_linear_flops_match_a_direct_count(family, kv, density):
    tables = gate_tables(2, density, symmetric=False)
    model = model_with_gates(family, kv, tables)
    got = counted_flops(model, tokens())
    want = predicted_linear_flops(model.cfg, kv, tables)
    for key in want:
        assert got[key] == want[key], f"{key}: counted {got[key]}, FLOP model {want[key]}"
    dense_got = counted_flops(model, tokens(), dense=True)
    dense_want = predicted_linear_flops(model.cfg, kv, tables, dense=True)
    for key in dense_want:
        assert dense_got[key] == dense_want[key], f"dense {key}: counted {dense_got[key]}, FLOP model {dense_want[key]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_visible_keys_counts_the_visible_pairs(family):
    cfg = ModelConfig(**FAMILIES[family])
    for layer in range(cfg.n_layers):
        assert visible_keys(cfg, layer, T) * T * B == visible_pairs(cfg, layer, "all", None)
    # decoding: the queries are the last n positions of the context
    for n in (1, 4):
        q_pos, k_pos = torch.arange(T - n, T)[None], torch.arange(T)[None]
        for layer in range(cfg.n_layers):
            window = cfg.sliding_window if cfg.layer_type(layer) == "sliding" else None
            pairs = int(attention_mask(q_pos, k_pos, window).sum())
            assert visible_keys(cfg, layer, T, queries=n) * n == pairs


@pytest.mark.parametrize("kv", router.KV_MODES)
def test_explicit_attention_computes_a_rectangle(kv):
    """The soft-capped kernel's matmuls: 4·H·D per (query, key) pair of the rectangle it is given.

    Every sequence keeps positions 8..17 at every sublayer. kv="kept": 10 queries x 10 keys.
    kv="all": the keys from the first one the earliest query can see (its window start on the
    sliding layer 0, position 0 on the full layer 1) to the last query, not all T keys."""
    first, last = 8, 17
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[:, first:last + 1] = True
    model = model_with_gates("gemma2", kv, {(l, k): keep for l in range(2) for k in ("attn", "mlp")})
    cfg = model.cfg
    n = last - first + 1
    if kv == "kept":
        rect = [n * n, n * n]
    else:
        rect = [n * (last + 1 - (first - cfg.sliding_window + 1)), n * (last + 1)]
    got = counted_flops(model, tokens())["scores"]
    assert got == 4 * cfg.n_heads * cfg.head_dim * B * sum(rect)
    # ... which is more than the pairs the model counts: the masked ones are computed too
    needed = sum(visible_pairs(cfg, l, kv, keep) for l in range(cfg.n_layers))
    assert needed < B * sum(rect)


def direct_ratio(model, kv, tables):
    """Sparse over dense FLOPs: linear layers counted, attention scores as visible pairs."""
    cfg, idx = model.cfg, tokens()
    per_pair = 2 * 2 * cfg.n_heads * cfg.head_dim
    sparse, dense = counted_flops(model, idx), counted_flops(model, idx, dense=True)
    linear = lambda c: sum(v for k, v in c.items() if k != "scores")
    pairs = lambda keep_of: sum(visible_pairs(cfg, l, kv, keep_of(l)) for l in range(cfg.n_layers))
    sparse_total = linear(sparse) + per_pair * pairs(lambda l: tables[(l, "attn")])
    dense_total = linear(dense) + per_pair * pairs(lambda l: None)
    return sparse_total / dense_total


@pytest.mark.parametrize("density", [1.0, 0.75, 0.5, 0.25])
@pytest.mark.parametrize("kv", router.KV_MODES)
def test_compute_ratio_equals_the_direct_count(kv, density):
    tables = gate_tables(2, density, symmetric=True)
    model = model_with_gates("llama", kv, tables)
    measured = {k: float(t.float().mean()) for k, t in tables.items()}
    want = direct_ratio(model, kv, tables)
    assert compute_ratio(model.cfg, T, measured, kv) == pytest.approx(want, rel=1e-9)
    if density < 1:
        assert want < 1


@pytest.mark.parametrize("kv", router.KV_MODES)
def test_compute_ratio_with_windows_and_random_gates(kv):
    tables = gate_tables(2, 0.5, symmetric=False, seed=3)
    model = model_with_gates("gemma2", kv, tables)
    measured = {k: float(t.float().mean()) for k, t in tables.items()}
    assert compute_ratio(model.cfg, T, measured, kv) == pytest.approx(direct_ratio(model, kv, tables), rel=0.01)


@pytest.mark.parametrize("attn_kept", [(True, False), (False, True)], ids=["sliding_kept", "full_kept"])
@pytest.mark.parametrize("kv", router.KV_MODES)
def test_compute_ratio_with_windows_is_exact_when_each_attention_keeps_all_or_nothing(kv, attn_kept):
    """Each layer's attention kept by every token or by none (MLPs at random): every kept query
    sees exactly its layer's visible keys, so the FLOP model is exact, the sliding layer's band
    (window 5 of 24) and the full layer's triangle each counted as their own."""
    tables = gate_tables(2, 0.5, symmetric=False, seed=3)
    for layer, kept in enumerate(attn_kept):
        tables[(layer, "attn")] = torch.full((B, T), kept)
    model = model_with_gates("gemma2", kv, tables)
    assert [model.cfg.layer_type(l) for l in range(2)] == ["sliding", "full"]
    measured = {k: float(t.float().mean()) for k, t in tables.items()}
    assert compute_ratio(model.cfg, T, measured, kv) == pytest.approx(direct_ratio(model, kv, tables), rel=1e-9)


def test_a_substitute_that_costs_what_a_skip_saves_is_refused():
    """A skip's saving is net of its substitute: a rank whose two matmuls cost what the skip saves
    would make the FLOP-weighted density meaningless (and the routers' fit take the log of a
    saving <= 0), so it is refused, with the lowest rank that is."""
    cfg = ModelConfig(**dict(LLAMA, ffn_dim=8))                     # an MLP cheaper than attention
    cfg.substitute = cfg.dim
    with pytest.raises(ValueError, match="skip of an MLP saves: use --substitute below") as info:
        skip_savings(cfg, 16)
    below = int(str(info.value).rsplit(" ", 1)[1])
    cfg.substitute = below - 1
    assert 0 < skip_savings(cfg, 16)["mlp"] <= 4 * cfg.dim
    cfg.substitute = below
    with pytest.raises(ValueError, match=f"below {below}"):
        skip_savings(cfg, 16)
