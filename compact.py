"""compact.py — token compaction: a skipped sublayer is not computed, not just multiplied by 0.

This is the part of nanoskip that turns skipped tokens into saved time. model.py's `Block`
asks its routers which tokens compute a sublayer (a (B, T) bool `keep`), then calls here:

    kept_rows(f, h, x, keep)      # MLP: gather the kept rows of the whole batch, run f on
                                  # them only, scatter-add the result back into h
    skipped_rows(skip, h, x, keep)   # what a skipped token adds instead (router.Substitute)
    attention(a, out, h, x, keep, ...)   # attention of the kept tokens only

The MLP is row-wise, so compacting it is a gather and a scatter. Attention is not: a kept
query must still see the keys it saw in the dense model, at the rotary positions it had.
Two modes say what a skipped token leaves behind (ModelConfig.kv):

- kv="all" (the default): every token still writes K and V (the KV cache stays complete);
  only kept tokens make a query, scores and an output projection. Queries attend in blocks
  of 128 over only the keys they can reach (`attend_blocks`; on a GPU in one call). While
  decoding one token at a time, a token that skips the attention defers its K/V (`defer_kv`):
  the next token that computes it projects them with its own, in one matmul (`write_kv`).
- kv="kept" (Mixture-of-Depths style): a skipped token is absent from the sublayer, as
  query and as key; each layer's cache grows only by what that layer kept (`attend_kept`).

Kept tokens of each sequence are packed side by side, padded to the longest count
(`pack`, `to_packed`, `from_packed`): queries of different sequences never meet, so a
(B, Tp) layout keeps the batched kernels and wastes only the padding.

Also here: the KV cache (`KVCache`, one `LayerCache` per layer, written by position; a
kv="kept" layer fills each sequence's to its own level), and the decoding step of batch 1
(`step`), where compaction is a plain branch per gate.

model.py imports this file; it imports router.py. `a` is model.Attention.
Shapes: B batch, T tokens in this call, N kept tokens, Tp = the most kept by one sequence,
S cached tokens, d model width, H query heads, Hkv key/value heads, D head dim.
"""
from dataclasses import dataclass
from typing import Optional

import torch

import router


# ----------------------------------------------------------------------------------------------
# Gather and scatter
# ----------------------------------------------------------------------------------------------

def count(keep: torch.Tensor) -> int:
    """How many tokens compute (one device sync; a single decoded token needs no sum)."""
    return int(keep.item()) if keep.numel() == 1 else int(keep.sum())


def gather_rows(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The rows (N, d) of x (B, T, d) at the flat row indices (N,). index_select rather than
    x[flat]: general indexing copies 256 rows of 576 three times slower on this CPU."""
    return x.flatten(0, 1).index_select(0, flat)


def scatter_add_rows(h: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h (B, T, d) with rows (N, d) added at the flat row indices; out of place."""
    B, T, d = h.shape
    return h.reshape(B * T, d).index_add(0, flat, rows.to(h.dtype)).view(B, T, d)


def kept_rows(f, h, x, keep):
    """h + f(x) where keep is True, h elsewhere, running the row-wise f on the kept rows only.

    f: (..., d) -> (..., d); h, x (B, T, d); keep (B, T) bool.
    """
    n = count(keep)
    if n == keep.numel():                                     # all of them: no gather
        return h + f(x)
    if n == 0:
        return h                                              # weights not touched
    flat = keep.flatten().nonzero().squeeze(1)                # (N,) rows of kept tokens
    return scatter_add_rows(h, flat, f(gather_rows(x, flat)))


def skipped_rows(skip, h, x, keep):
    """h + skip(x) where keep is False, h elsewhere, running the substitute (router.Substitute)
    on the skipped rows only; h itself when a skip adds 0 (skip None)."""
    n = 0 if skip is None else keep.numel() - count(keep)
    if n == 0:
        return h
    if n == keep.numel():
        return h + skip(x)
    flat = (~keep).flatten().nonzero().squeeze(1)             # (N,) rows of skipped tokens
    return scatter_add_rows(h, flat, skip(gather_rows(x, flat)))


@dataclass
class Packing:
    """Where the kept tokens of a (B, T) gate pattern go in a padded (B, Tp) layout.

    Kept token n sits at (b_idx[n], t_idx[n]) in the original layout and at (b_idx[n], slot[n])
    in the packed one; Tp = the largest per-sequence count. `flat` = b_idx * T + t_idx, the row
    of the token in a (B*T, d) view."""
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


# ----------------------------------------------------------------------------------------------
# Compacted attention
# ----------------------------------------------------------------------------------------------

def attention(a, out, h, x, keep, cos, sin, pos, cache, kv: str):
    """h + out(attention output) for the tokens keep marks; h unchanged for the others.

    a: the layer's Attention; out: what follows its output projection (Gemma 2/3's post-norm);
    h, x (B, T, d); keep, pos (B, T); cos, sin (1, T, D); cache: the layer's LayerCache or None.
    """
    B, T, _ = x.shape
    n = count(keep)
    if n == B * T:                                              # everyone computes: plain attention
        return h + out(a(x, cos, sin, pos, cache))
    if kv == "all":   # every token writes K/V; only kept tokens ask (query, scores, output projection)
        if cache is not None:
            write_kv(a, cache, x, cos, sin, pos)
        else:
            k, v = a.project_kv(x, cos, sin)                    # (B, Hkv, T, D)
    if n == 0:
        return h                                                # nobody asks: no q, no wo, no keys read
    if kv == "all" and cache is not None:
        k, v, _, _ = cache.view()                               # key s is the token at position s
    p = pack(keep)
    xp = to_packed(gather_rows(x, p.flat), p, B)                # (B, Tp, d)
    q_pos = to_packed(pos[0].index_select(0, p.t_idx), p, B)    # (B, Tp) original positions
    cos_p, sin_p = (to_packed(c[0].index_select(0, p.t_idx), p, B) for c in (cos, sin))
    q = a.project_q(xp, cos_p, sin_p)                           # (B, H, Tp, D)
    if kv == "all":
        y = attend_blocks(a, q, k, v, q_pos, None if p.even else p.valid)   # (B, Tp, H*D)
    else:
        y = attend_kept(a, xp, q, q_pos, cos_p, sin_p, p, cache)
    return scatter_add_rows(h, p.flat, out(a.wo(from_packed(y, p))))   # (N, d) added back


def attend_cache(a, q, pos, cache):
    """Queries q (B, H, T, D) at positions pos (B, T), whose K/V the cache already holds
    (write_kv), attend over everything cached -> (B, T, H*D)."""
    k, v, k_pos, k_valid = cache.view()                               # (B, Hkv, S, D) ...
    if q.shape[2] == 1 and a.window is None and k_valid is None:
        return a.attend(q, k, v, None)       # one new token and every cached key is visible
    return a.attend(q, k, v, a.mask(pos, k_pos, k_valid))


def write_kv(a, cache, x, cos, sin, pos):
    """Project the K/V of tokens x (B, T, d) at positions pos (B, T) (cos, sin (1, T, D)), and of
    the tokens that deferred theirs before them, and write them all to the layer's cache."""
    x, cos, sin, pos = cache.take_deferred(x, cos, sin, pos)
    cache.append(*a.project_kv(x, cos, sin), pos)


# A decoding step of batch 1 whose token skips an attention (kv="all") does not project its K/V:
# no query needs them until a later token computes this attention, and then they are projected with
# that token's in one matmul, which costs about what one token's does (it reads the same weights).
# At most MAX_DEFERRED wait: a layer that skips for long holds a bounded list.
MAX_DEFERRED = 64


def defer_kv(a, cache, x, cos, sin, pos):
    """The one token x (1, 1, d) of a decoding step skips attention a (kv="all"): keep its input
    for the next write_kv of this layer, or write them all when MAX_DEFERRED are waiting."""
    if len(cache.deferred) + 1 < MAX_DEFERRED:
        cache.deferred.append((x, cos, sin, pos))
    else:
        write_kv(a, cache, x, cos, sin, pos)


# Queries per block of attend_blocks by device type. On a GPU a block's launches and syncs cost more
# than the keys it skips (8B heads, 1017 of 2048 queries: 2.33 ms, one masked call 0.23 ms; dense 0.18).
QUERY_BLOCK = {"cpu": 128}


def attend_blocks(a, q, k, v, q_pos, valid=None):
    """Queries q (B, H, Tq, D) at positions q_pos (B, Tq) over keys k, v (B, Hkv, S, D) that sit
    at their positions (key s is the token at position s, cached or not) -> (B, Tq, H*D).

    A block of queries needs only the keys from its earliest window start to its last position,
    so the work follows the visible pairs, not the (Tq x S) rectangle of one masked call (a GPU's
    choice, QUERY_BLOCK). Used by kv="all" for the packed kept queries (valid (B, Tq) bool: which
    slots hold a token; None: all), and by model.Attention for a sliding layer (its band)."""
    block = QUERY_BLOCK.get(q.device.type)                           # None: one call, no host sync
    one, block, ys = block is None, block or q.shape[2], []
    for i in range(0, q.shape[2], block):
        qp = q_pos[:, i:i + block]                                    # (B, Tb) (padding: 0)
        hi = k.shape[2] if one else int(qp.max()) + 1
        lo = 0 if one or a.window is None else max(0, int(qp.min()) - a.window + 1)
        k_pos = torch.arange(lo, hi, device=q.device).expand(q.shape[0], -1)
        mask = a.mask(qp, k_pos)                                      # (B, 1, Tb, hi - lo)
        if valid is not None:
            mask |= ~valid[:, None, i:i + block, None]                # padded queries: no all-masked rows
        ys.append(a.attend(q[:, :, i:i + block], k[:, :, lo:hi], v[:, :, lo:hi], mask))
    return torch.cat(ys, dim=1)


def attend_kept(a, xp, q, q_pos, cos_p, sin_p, p: Packing, cache):
    """kv="kept": skipped tokens are absent, so the keys are the kept tokens, packed like the
    queries q (B, H, Tp, D) (and, with a cache, the kept tokens of earlier calls)."""
    k, v = a.project_kv(xp, cos_p, sin_p)                             # (B, Hkv, Tp, D)
    if cache is None and a.window is None and a.softcap is None:
        # Keys are the queries, in order: the causal triangle over the kept tokens. A real
        # query never sees the padding, which comes after it.
        return a.attend(q, k, v, None, causal=True)
    if cache is None:
        k_pos, k_valid = q_pos, None if p.even else p.valid
    else:
        cache.append(k, v, q_pos, p)
        k, v, k_pos, k_valid = cache.view()                           # (B, Hkv, S, D) ...
    mask = a.mask(q_pos, k_pos, k_valid)                              # (B, 1, Tp, S)
    if not p.even:
        mask |= ~p.valid[:, None, :, None]                            # padded queries: no all-masked rows
    return a.attend(q, k, v, mask)                                    # (B, Tp, H*D)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------

class LayerCache:
    """K/V cache of one layer, written by position like gpt-fast's static cache.

    Every sequence has its own fill level, so a kv="kept" layer stores only the tokens
    that layer kept: k, v (B, Hkv, S, D); pos (B, S) original positions; lengths, the
    filled slots per sequence, as Python ints (reading them costs no device sync).
    """

    def __init__(self, B, Hkv, S, D, dtype, device):
        self.k = torch.zeros(B, Hkv, S, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(B, S, dtype=torch.long, device=device)
        self.lengths = [0] * B
        self.deferred = []   # (x, cos, sin, pos) of tokens whose K/V wait to be projected (defer_kv)

    def take_deferred(self, x, cos, sin, pos):
        """The deferred tokens' inputs, then these: x (B, T', d), cos, sin (1, T', D), pos (B, T')."""
        if not self.deferred:
            return x, cos, sin, pos
        parts = zip(*self.deferred, (x, cos, sin, pos))
        self.deferred = []
        return tuple(torch.cat(p, dim=1) for p in parts)

    def append(self, k, v, pos, p: Optional[Packing] = None):
        """Write new k, v (B, Hkv, T, D) at positions pos (B, T); with p, only its valid slots."""
        B, _, T, _ = k.shape
        even = min(self.lengths) == max(self.lengths)
        if p is None and not even:
            # kv="kept" layers fill unevenly: write each sequence at its own level
            p = pack(torch.ones(B, T, dtype=torch.bool, device=k.device))
        if p is None:  # every sequence writes all T tokens at the same level
            start = self.lengths[0]
            self.k[:, :, start:start + T] = k
            self.v[:, :, start:start + T] = v
            self.pos[:, start:start + T] = pos
            self.lengths = [n + T for n in self.lengths]
            return
        lengths = [n + c for n, c in zip(self.lengths, p.sizes)]
        dst = torch.tensor(self.lengths, device=k.device)[p.b_idx] + p.slot    # (N,) where each token goes
        self.k[p.b_idx, :, dst] = k[p.b_idx, :, p.slot]
        self.v[p.b_idx, :, dst] = v[p.b_idx, :, p.slot]
        self.pos[p.b_idx, dst] = pos[p.b_idx, p.slot]
        self.lengths = lengths

    def view(self):
        """Filled part: k, v (B, Hkv, S', D), pos (B, S') with S' the longest fill, and
        valid (B, S') bool, or None when every sequence fills all S' slots."""
        assert not self.deferred, "deferred K/V not written: write_kv first"
        n, device = max(self.lengths), self.pos.device
        valid = (torch.arange(n, device=device) < torch.tensor(self.lengths, device=device)[:, None]
                 if min(self.lengths) < n else None)
        return self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n], valid


class KVCache:
    """One LayerCache per layer, plus how many positions every sequence has seen."""

    def __init__(self, cfg, batch_size: int, max_len: int, dtype, device):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"{max_len} tokens exceed the model's context of {cfg.max_seq_len}: "
                             "use a shorter prompt or fewer new tokens")
        self.layers = [LayerCache(batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device)
                       for _ in range(cfg.n_layers)]
        self.batch_size, self.max_len, self.context, self.seen = batch_size, max_len, cfg.max_seq_len, 0

    def reserve(self, T: int) -> int:
        """The position of the first of T new tokens, checked to fit before any layer writes."""
        n = self.seen + T                                  # every layer holds at most n tokens then
        if n > self.max_len:                               # max_len <= the model's context
            raise ValueError(f"{n} tokens exceed the model's context of {self.context}" if n > self.context else
                             f"KV cache full: {self.seen} + {T} tokens > its {self.max_len} slots: make it with "
                             f"model.new_cache(batch_size, max_len) for max_len >= {n}")
        return self.seen


# ----------------------------------------------------------------------------------------------
# A decoding step of batch 1: one token, so each gate is one bool
# ----------------------------------------------------------------------------------------------

def step(block, h, ctx):
    """model.Block.forward for the one token h (1, 1, d) of a decoding step of batch 1, with a cache:
    each gate is one bool, so a sublayer simply runs or not (no gather, no scatter). The compacted
    path's gates and numbers in fewer ops: at one token an op costs its fixed overhead, and a skip
    should cost little more than its norm and router. A skipped attention's K/V wait (defer_kv)."""
    a, cache, layer = block.attn, ctx.cache.layers[block.layer], block.layer
    cos, sin = ctx.rope[a.window is not None]                         # (1, 1, D)
    one_gate = block.cfg.route == "block"                             # it decides both sublayers
    x = block.attn_norm(h)                                            # (1, 1, d)
    keep = decide_token(block.attn_router, x, layer, ("attn", "mlp") if one_gate else ("attn",),
                        ctx.records, ctx.routers_off, ctx.sink)
    if keep:
        h = h + block.attn_post_norm(a(x, cos, sin, ctx.pos, cache))
    else:
        if block.cfg.kv == "all":          # a skipped token still has K/V: projected when next needed
            defer_kv(a, cache, x, cos, sin, ctx.pos)
        h = h if block.attn_skip is None else h + block.attn_skip(x)
    x = block.mlp_norm(h)
    if not one_gate:
        keep = decide_token(block.mlp_router, x, layer, ("mlp",), ctx.records, ctx.routers_off, ctx.sink)
    if keep:
        return h + block.mlp_post_norm(block.mlp(x))
    return h if block.mlp_skip is None else h + block.mlp_skip(x)


def decide_token(r, x: torch.Tensor, layer: int, kinds: tuple, records: list,
                 routers_off: bool = False, sink: Optional[torch.Tensor] = None) -> bool:
    """router.decide for the one token x (1, 1, d) of a decoding step of batch 1, and nothing
    around it (each op and call costs µs here): whether it computes, as a bool, with one record
    per kind in kinds appended to records (a "block" route records its gate as both)."""
    if r is None or routers_off:
        return True
    z = r.forward(x)       # (1, 1); not r(x): a router has no hooks, and __call__ costs as much as its op
    if sink is not None:
        z = z.masked_fill(sink, router.SINK_LOGIT)
    kept = z.item() > 0                                                  # the one read (a device sync on a GPU)
    keep = token_keep(kept, z.device)
    for kind in kinds:
        records.append(router.GateRecord(layer, kind, z, keep))
    return kept


_TOKEN_KEEP = {}   # (kept, device) -> (1, 1) bool tensor


def token_keep(kept: bool, device) -> torch.Tensor:
    """The (1, 1) keep tensor of a one-token decision, made once per value and device: a decoding
    step records its decisions without an op. Shared: read it, never write to it."""
    key = (kept, device)
    if key not in _TOKEN_KEEP:
        _TOKEN_KEEP[key] = torch.full((1, 1), kept, device=device)
    return _TOKEN_KEEP[key]
