"""Token compaction: the compacted path gives the masked path's answer, for any gates.

    python -m pytest tests/test_compaction.py -q

The gates are forced, not learned: every router is replaced by a `TableRouter` that
reads its decision for (sequence, position) from a fixed table, so a test can say
"this sequence keeps nothing at layer 0's MLP, that one keeps everything". Checked,
on tiny random models of every family and both kv modes:
- compacted logits == masked logits (float32 tolerance), batch 3 with one sequence
  keeping every token, one keeping none and one in between, per routed sublayer;
- greedy decoding through the compacted path with a KV cache gives exactly the tokens
  (and the logits) of recomputing the whole sequence with the masked path at each step;
- in kv="kept" a layer's cache holds exactly the tokens that layer kept, per sequence;
- a sublayer that every token skips is not run at all (its modules' hooks never fire).
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: model.py, router.py, compact.py

import compact
import gates
import model as model_module
import router
from conftest import TINY as BASE
from model import Model, ModelConfig, rope_cos_sin
_GEMMA = dict(norm_eps=1e-6, norm_offset=True, act="gelu_tanh", embed_scale=True)
FAMILIES = {
    # grouped K/V heads, llama3 rope scaling, untied head
    "llama_gqa": dict(BASE, tie_embeddings=False, rope_theta=5e5,
                      rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_seq_len=16)),
    "qwen2_bias": dict(BASE, qkv_bias=True),
    # one K/V head for all queries, head_dim unlike dim / heads
    "gemma1_mqa": dict(BASE, **_GEMMA, n_kv_heads=1, head_dim=16),
    # soft-caps (the explicit attention path) and a sliding window shorter than the sequence
    "gemma2": dict(BASE, **_GEMMA, sandwich_norm=True, query_scale=8.0, attn_softcap=2.0, final_softcap=5.0,
                   sliding_window=4, layer_types=("sliding", "full")),
    # q/k norms, two rope bases, layer_types, a window (the fused kernel with a mask)
    "gemma3": dict(BASE, **_GEMMA, sandwich_norm=True, qk_norm=True, query_scale=8.0, sliding_window=4,
                   layer_types=("sliding", "full"), rope_theta=1e6, rope_local_theta=1e4),
}
BATCH, SEQ = 3, 16


def tiny_model(family: str, seed: int = 0) -> Model:
    """A random model with random norm weights (so no norm is the identity)."""
    torch.manual_seed(seed)
    model = Model(ModelConfig(**FAMILIES[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(-0.5, 0.5) if model.cfg.norm_offset or name.endswith(".bias") else p.uniform_(0.5, 1.5)
    return model.eval()


def tokens(B=BATCH, T=SEQ, seed=2):
    return torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Forced gates
# ----------------------------------------------------------------------------------------------

class GateTable:
    """keep[(layer, kind)]: (B, T) bool decisions by (sequence, position), plus the position
    of the first token of the next forward call (a router sees hidden states, not positions)."""

    def __init__(self, keep: dict):
        self.keep = keep
        self.start = 0


class TableRouter(router.Router):
    """A router whose logit is +1 where the table keeps the token and -1 where it skips it."""

    def __init__(self, dim: int, table: GateTable, layer: int, kind: str):
        super().__init__(dim)
        self.table, self.layer, self.kind = table, layer, kind

    def forward(self, x):
        B, T, _ = x.shape
        s = self.table.start
        keep = self.table.keep[(self.layer, self.kind)][:B, s:s + T]
        assert keep.shape == (B, T), "the gate table is shorter than the sequence"
        return torch.where(keep, 1.0, -1.0)


def mixed_table(n_layers: int, B=BATCH, T=SEQ, seed=3) -> dict:
    """Per (layer, kind): one sequence keeps every token, one only its sink (position 0 always
    computes), the others a random density; which sequence plays which role changes from
    sublayer to sublayer."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for i, (layer, kind) in enumerate((l, k) for l in range(n_layers) for k in ("attn", "mlp")):
        density = 0.2 + 0.6 * torch.rand(B, 1, generator=g)             # (B, 1)
        table = torch.rand(B, T, generator=g) < density                 # (B, T)
        table[i % B] = True
        table[(i + 1) % B] = False
        table[:, 0] = True
        keep[(layer, kind)] = table
    return keep


def force_gates(model: Model, route: str, kv: str, keep: dict) -> GateTable:
    """Attach routers for `route` and `kv`, then replace each by a TableRouter reading `keep`."""
    router.add_routers(model, route, kv)
    table = GateTable(keep)
    for layer, kind, _ in router.routers(model):
        setattr(model.layers[layer], f"{kind}_router", TableRouter(model.cfg.dim, table, layer, kind))
    return table


def assert_logits_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Compacted == masked
# ----------------------------------------------------------------------------------------------

def test_mixed_table_has_every_kind_of_sequence():
    for t in mixed_table(2).values():
        counts = t.sum(1)
        assert counts.max() == SEQ and counts.min() == 1 and ((counts > 1) & (counts < SEQ)).any()


@pytest.mark.parametrize("route", router.ROUTES)
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_compacted_logits_equal_masked_logits(family, kv, route):
    model = tiny_model(family)
    keep = mixed_table(model.cfg.n_layers)
    force_gates(model, route, kv, keep)
    idx = tokens()
    with torch.no_grad():
        masked, masked_records = model(idx, masked=True)
        compact, compact_records = model(idx)
        dense, _ = model(idx, routers_off=True)
    assert_logits_close(compact, masked)
    # the gates really change the answer, for every sequence that skipped something
    assert (compact - dense).abs().amax(dim=(1, 2)).min() > 1e-2
    assert [(r.layer, r.kind) for r in compact_records] == [(r.layer, r.kind) for r in masked_records]
    for r in compact_records:
        assert torch.equal(r.keep, keep[(r.layer, "attn" if route == "block" else r.kind)])


# compact.QUERY_BLOCK: a CPU's blocks of 128 queries, and a GPU's one call (the rule applied on the CPU)
QUERY_BLOCKS = pytest.mark.parametrize("query_block", [compact.QUERY_BLOCK, {}], ids=["blocks", "one_call"])


@QUERY_BLOCKS
@pytest.mark.parametrize("B", [3, 1])
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gemma3"])
def test_long_sequences_attend_in_blocks_of_queries(family, kv, B, query_block, monkeypatch):
    """More kept queries than one block of compact.attend_blocks, a window far shorter than the sequence.
    B=1: no padding, so the keys of each block are trimmed to its window (layer 0 slides). The same
    logits when every query attends in one masked call over every key (a GPU's rule). kv="all":
    the attention calls are one per block of 128 kept queries (or one over all T keys), and with
    B=1 each reads the keys from its first query's window start (0 on a full layer) to its last
    query; kv="kept": one call per layer over the kept tokens."""
    monkeypatch.setattr(compact, "QUERY_BLOCK", query_block)
    model = tiny_model(family)
    model.cfg.max_seq_len = 320
    for block in model.layers:
        if block.attn.window is not None:
            block.attn.window = 40
    T = 300
    keep = mixed_table(model.cfg.n_layers, T=T)
    if B == 1:
        g = torch.Generator().manual_seed(4)
        keep = {k: torch.rand(1, T, generator=g) < 0.7 for k in keep}   # ~210 kept: two blocks
    force_gates(model, "sublayer", kv, keep)
    idx = tokens(B=B, T=T)
    with torch.no_grad():
        masked, _ = model(idx, masked=True)
        widths = {layer: [] for layer in range(model.cfg.n_layers)}        # key widths of each attention call
        for layer, block in enumerate(model.layers):
            monkeypatch.setattr(block.attn, "attend", lambda q, k, v, *a, seen=widths[layer], attend=block.attn.attend,
                                **kw: seen.append(k.shape[2]) or attend(q, k, v, *a, **kw))
        compacted, _ = model(idx)
    assert_logits_close(compacted, masked)
    for layer, block in enumerate(model.layers):
        kept = [row.nonzero()[:, 0] for row in keep[(layer, "attn")][:B]]   # each sequence's kept positions
        n_kept = max(len(k) for k in kept)
        if kv == "kept":
            assert widths[layer] == [n_kept], layer
        elif not query_block:
            assert widths[layer] == [T], layer
        elif B > 1:
            assert len(widths[layer]) == -(-n_kept // 128) > 1, layer
        else:
            window = block.attn.window
            want = [int(b[-1]) + 1 - (0 if window is None else max(0, int(b[0]) - window + 1))
                    for b in kept[0].split(128)]
            assert len(want) > 1 and widths[layer] == want, layer
    assert any(block.attn.window for block in model.layers) == (family != "llama_gqa")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_sliding_layer_attends_only_its_band(family, monkeypatch):
    """Every token of a sliding layer (dense prefill, training) in blocks of queries over the keys
    their window reaches = one call over the whole (T, T) masked scores; no call sees more keys
    than window + block - 1."""
    model = tiny_model(family)
    a = model.layers[0].attn
    a.window, T = 40, 300
    x = torch.randn(2, T, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T)[None].expand(2, -1)                                 # (B, T)
    cos, sin = rope_cos_sin(model.inv_freq(True, "cpu"), pos[:1], torch.float32)
    with torch.no_grad():
        q, (k, v) = a.project_q(x, cos, sin), a.project_kv(x, cos, sin)
        whole = a.wo(a.attend(q, k, v, a.mask(pos, pos)))                     # (B, T, d)
        widths, attend = [], a.attend
        monkeypatch.setattr(a, "attend", lambda q, k, v, mask: widths.append(k.shape[2]) or attend(q, k, v, mask))
        band = a(x, cos, sin, pos)
    assert len(widths) == 3 and max(widths) == 40 + 128 - 1
    torch.testing.assert_close(band, whole)


@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", ["llama_gqa", "gemma1_mqa"])
def test_masked_attention_on_a_gpu_repeats_grouped_kv_heads(family, kv, monkeypatch):
    """On CUDA a masked SDPA call gets K/V heads repeated to the query heads (model.MASKED_REPEAT_KV:
    the memory-efficient kernel takes no grouped heads with a mask). The rule applied on the CPU
    here: every masked call sees H K/V heads, no enable_gqa, and the logits do not change."""
    model = tiny_model(family)
    force_gates(model, "sublayer", kv, mixed_table(model.cfg.n_layers))
    idx = tokens()
    with torch.no_grad():
        before = model(idx)[0], model(idx, masked=True)[0]
        calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
        spy = lambda q, k, v, attn_mask=None, enable_gqa=False, **kw: (   # noqa: E731
            calls.append((attn_mask is not None, k.shape[1], enable_gqa)) or sdpa(q, k, v, attn_mask=attn_mask,
                                                                                 enable_gqa=enable_gqa, **kw))
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        monkeypatch.setattr(model_module, "MASKED_REPEAT_KV", ("cpu",))
        after = model(idx)[0], model(idx, masked=True)[0]
    masked_calls = [(heads, gqa) for masked, heads, gqa in calls if masked]
    assert masked_calls and set(masked_calls) == {(model.cfg.n_heads, False)}
    for a, b in zip(after, before):
        assert_logits_close(a, b)


# ----------------------------------------------------------------------------------------------
# KV-cached decoding == full recomputation
# ----------------------------------------------------------------------------------------------

def greedy_by_recomputation(model, table, prompt, n_new):
    """Greedy tokens and last-position logits, running the masked path over everything each step."""
    idx, logits = prompt, []
    for _ in range(n_new):
        table.start = 0
        out, _ = model(idx, masked=True)
        logits.append(out[:, -1])
        idx = torch.cat([idx, out[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx, torch.stack(logits, 1)


def greedy_with_cache(model, table, prompt, n_new):
    """The same through the compacted path with a KV cache: prefill the prompt, then one token per call."""
    B, T0 = prompt.shape
    cache = model.new_cache(B, T0 + n_new)
    idx, logits, fed = prompt, [], 0
    for _ in range(n_new):
        table.start = cache.seen
        out, _ = model(idx[:, fed:], cache=cache, last_only=True)       # (B, 1, V)
        fed = idx.shape[1]
        logits.append(out[:, -1])
        idx = torch.cat([idx, out[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx, torch.stack(logits, 1), cache


@pytest.mark.parametrize("kv", router.KV_MODES)
def test_a_call_past_the_cache_is_refused_before_any_layer_writes(kv):
    """kv="kept" layers fill unevenly: the check comes before the first layer, not inside one."""
    model = tiny_model("llama_gqa")
    table = force_gates(model, "sublayer", kv, mixed_table(model.cfg.n_layers, B=1))
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(tokens(B=1, T=6), cache=cache)
        before = [list(c.lengths) for c in cache.layers]
        table.start = 6
        with pytest.raises(ValueError, match="KV cache full: 6 \\+ 3 tokens > its 8 slots: make it with model.new_cache"):
            model(tokens(B=1, T=3), cache=cache)
        assert [c.lengths for c in cache.layers] == before and cache.seen == 6
        model(tokens(B=1, T=2), cache=cache)                            # what fits still goes in
    assert cache.seen == 8


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_equals_recomputation(family, kv, B):
    model = tiny_model(family)
    keep = mixed_table(model.cfg.n_layers)
    table = force_gates(model, "sublayer", kv, keep)
    prompt, n_new = tokens(B, 6), SEQ - 6
    with torch.no_grad():
        want, want_logits = greedy_by_recomputation(model, table, prompt, n_new)
        got, got_logits, cache = greedy_with_cache(model, table, prompt, n_new)
    assert torch.equal(got, want)
    assert_logits_close(got_logits, want_logits)
    for layer, lc in enumerate(cache.layers):
        kept = keep[(layer, "attn")][:B, :SEQ - 1].sum(1)            # the last token is never fed
        held = [n + len(lc.deferred) for n in lc.lengths]             # written, or waiting (defer_kv)
        assert held == (kept if kv == "kept" else torch.full((B,), SEQ - 1)).tolist()


@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gemma3"])
def test_a_skipped_attention_projects_its_kv_with_the_next_token_that_computes(family, monkeypatch):
    """kv="all", batch 1: a decoding token that skips an attention does not project its K/V
    (compact.defer_kv); the next token that computes that attention projects them with its own,
    in one call, and MAX_DEFERRED bounds the wait. Tokens and logits stay those of recomputation
    (gemma2, gemma3: a sliding window of 4 over the deferred keys)."""
    model = tiny_model(family)
    T0, L = 4, model.cfg.n_layers
    keep = {(l, k): torch.ones(1, SEQ, dtype=torch.bool) for l in range(L) for k in ("attn", "mlp")}
    keep[(0, "attn")][0, T0:T0 + 5] = False           # layer 0: five decoded tokens skip, then all compute
    keep[(1, "attn")][0, T0:] = False                 # layer 1: every decoded token skips
    table = force_gates(model, "sublayer", "all", keep)
    monkeypatch.setattr(compact, "MAX_DEFERRED", 4)
    projected = {l: [] for l in range(L)}             # tokens per K/V projection, after the prompt
    for l, block in enumerate(model.layers):
        a, project = block.attn, block.attn.project_kv
        monkeypatch.setattr(a, "project_kv", lambda x, c, s, l=l, f=project: projected[l].append(x.shape[1]) or f(x, c, s))
    prompt, n_new = tokens(1, T0), SEQ - T0
    with torch.no_grad():
        want, want_logits = greedy_by_recomputation(model, table, prompt, n_new)
        for rows in projected.values():
            rows.clear()
        got, got_logits, cache = greedy_with_cache(model, table, prompt, n_new)
    assert torch.equal(got, want)
    assert_logits_close(got_logits, want_logits)
    # decoded positions 4..14: layer 0 defers 4, 5, 6 and writes them with 7 (the fourth waiting),
    # defers 8 and writes it with 9; layer 1 writes 4..7 and 8..11 and still holds 12, 13, 14
    assert projected[0] == [T0, 4, 2, 1, 1, 1, 1, 1]
    assert projected[1] == [T0, 4, 4] and len(cache.layers[1].deferred) == 3
    assert cache.layers[1].lengths == [T0 + 8]


@pytest.mark.parametrize("route", ["sublayer", "block"])
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gemma3"])
def test_a_decoding_step_of_batch_one_is_a_plain_branch(family, kv, route, monkeypatch):
    """One token of batch 1 through a cache takes Block.step (each gate one bool, no compaction):
    learned routers with random weights (some sublayers skip, some compute) give the gates and
    the logits (so the greedy tokens) of recomputing everything with the masked path."""
    model = tiny_model(family)
    router.add_routers(model, route, kv)
    torch.manual_seed(4)
    for _, _, r in router.routers(model):                                  # z = w.x: about half skip
        torch.nn.init.normal_(r.proj.weight, std=0.5)
        torch.nn.init.zeros_(r.proj.bias)
    idx, T0 = tokens(1, SEQ), 6
    skipped = {"attn": 0, "mlp": 0}
    with torch.no_grad():
        cache = model.new_cache(1, SEQ)
        model(idx[:, :T0], cache=cache)                                     # the prefill: compacted
        for name in ("attention", "kept_rows"):                             # from here on: never
            monkeypatch.setattr(compact, name, lambda *a, name=name, **k: pytest.fail(f"compact.{name} ran"))
        for t in range(T0, SEQ):
            want, want_records = model(idx[:, :t + 1], masked=True)
            out, records = model(idx[:, t:t + 1], cache=cache)              # (1, 1, V)
            assert_logits_close(out[:, -1], want[:, -1])
            assert torch.equal(out[:, -1].argmax(-1), want[:, -1].argmax(-1))
            assert [(r.layer, r.kind) for r in records] == [(r.layer, r.kind) for r in want_records]
            assert all(torch.equal(r.keep, w.keep[:, -1:]) for r, w in zip(records, want_records))
            for r in records:
                skipped[r.kind] += not bool(r.keep)
    slots = (SEQ - T0) * model.cfg.n_layers
    assert all(0 < n < slots for n in skipped.values()), skipped


@QUERY_BLOCKS
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", ["llama_gqa", "gemma2", "gemma3"])
def test_chunked_prefill_with_cache_equals_one_pass(family, kv, query_block, monkeypatch):
    """Several tokens per call on top of a cache (uneven kv="kept" fills, windows over the cache), in
    blocks of queries or in one call over every slot of the cache (unwritten ones hidden by position)."""
    monkeypatch.setattr(compact, "QUERY_BLOCK", query_block)
    model = tiny_model(family)
    table = force_gates(model, "sublayer", kv, mixed_table(model.cfg.n_layers))
    idx = tokens()
    with torch.no_grad():
        table.start = 0
        want, _ = model(idx, masked=True)
        cache, got = model.new_cache(BATCH, SEQ), []
        for s in range(0, SEQ, 5):
            table.start = s
            got.append(model(idx[:, s:s + 5], cache=cache)[0])
    assert_logits_close(torch.cat(got, 1), want)


# ----------------------------------------------------------------------------------------------
# Skipped means not run
# ----------------------------------------------------------------------------------------------

def fired(modules: dict) -> dict:
    """Attach a forward hook to each module; returns {name: [calls]} filled as they run."""
    calls = {name: [] for name in modules}
    for name, m in modules.items():
        m.register_forward_hook(lambda mod, args, out, name=name: calls[name].append(args[0].shape))
    return calls


@pytest.mark.parametrize("chunk", [SEQ - 1, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("kv", router.KV_MODES)
def test_a_sublayer_every_token_skips_is_not_run(kv, chunk):
    """After the sink (position 0, which always computes), a call of `chunk` tokens that all
    skip a sublayer leaves its weights untouched."""
    model = tiny_model("gemma3")
    keep = mixed_table(model.cfg.n_layers)
    keep[(0, "attn")][:] = False
    keep[(0, "mlp")][:] = False
    table = force_gates(model, "sublayer", kv, keep)
    a, block = model.layers[0].attn, model.layers[0]
    calls = fired(dict(wq=a.wq, wk=a.wk, wv=a.wv, wo=a.wo, q_norm=a.q_norm, post=block.attn_post_norm,
                       mlp=block.mlp, mlp_post=block.mlp_post_norm, other_mlp=model.layers[1].mlp))
    idx = tokens()
    with torch.no_grad():
        cache = model.new_cache(BATCH, SEQ)
        model(idx[:, :SEQ - chunk], cache=cache)
        for c in calls.values():
            c.clear()
        table.start = SEQ - chunk
        model(idx[:, SEQ - chunk:], cache=cache)
    for name in ("wq", "wo", "q_norm", "post", "mlp", "mlp_post"):
        assert calls[name] == [], f"{name} ran for a sublayer every token skips"
    # in kv="all" the skipped tokens still write K and V; in kv="kept" they are absent
    assert (calls["wk"] != []) == (kv == "all") and (calls["wv"] != []) == (kv == "all")
    assert calls["other_mlp"] != []


@pytest.mark.parametrize("kv", router.KV_MODES)
def test_random_gates_at_density_one_and_zero(kv):
    """bench.py's forced gates: density 1 keeps every token (the dense model), density 0 none
    but the sink at position 0."""
    model = tiny_model("llama_gqa")
    router.add_routers(model, "sublayer", kv)
    idx = tokens(T=64)
    with torch.no_grad():
        dense, _ = model(idx, routers_off=True)
        for density in (1.0, 0.0):
            with gates.forced(model, density):
                logits, records = model(idx)
            assert all(bool(r.keep[:, 0].all() and (r.keep[:, 1:] == (density == 1.0)).all()) for r in records)
            assert torch.equal(logits, dense) == (density == 1.0)
