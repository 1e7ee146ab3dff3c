"""capacity.py — fixed-capacity compaction (bench.py, evaluate.py --capacity): a forward that reads
nothing back from the device until it ends, so a GPU's queue never drains, or the whole call
replays as one CUDA graph.

    fast = Capacity(model)                   # --capacity=eager
    fast = Capacity(model, graph=True)       # --capacity=graph: a CUDA device only
    fast = Capacity(model, compiled=True)    # --capacity=compiled (and compiled-graph: both)
    logits, records = fast(idx)              # a prefill: the compacted path's logits and gates

compact.py compacts exactly: each routed sublayer counts its kept tokens, reads the count back
and runs on just those rows. On a CPU the read costs nothing. On a GPU it drains the queue: the
host waits for the device, then the device for the host's next launches, and a compacted prefill
of Llama-3.1-8B's shape at density 0.5 kept its GPU busy 45 % of the time (RESULTS.md, "On a GPU").

Here each routed sublayer of a call runs on a number of rows fixed before the call, its
capacity: a stable sort of the gates puts the kept tokens first, in order, and the first C rows
are gathered, computed, and added back where the gate is on (a row past the kept ones is a
skipped token: computed, then dropped). Nothing is counted on the host, so nothing waits.

The capacities come from the calls before. Each call records every routed sublayer's kept
count on the device and reads them all back once, at its end (`Capacity.__call__`). The first
call of a kind (shape, flags, routers) runs every sublayer in full (every row computed, then
gated) to learn the counts; a sublayer's capacity is then its count plus a margin of
MARGIN * sqrt(count) (random gates' counts spread by sqrt(count) at most), rounded up to a
multiple of ROWS (`capacity_for`). A call in which some sublayer kept more than its capacity is
wrong from there on: it runs again in full (its cache rewound), and that capacity grows; a
capacity far above its counts shrinks (`settle`). So the answer is always the compacted path's,
whatever the gates: tests/test_capacity.py checks the logits and the tokens for every family, and
on a GPU that a call at fixed capacities never syncs.

graph=True (CUDA): a call without a cache is captured as a CUDA graph once per kind and set of
capacities (after two warm-up runs), then replayed: one launch for the whole forward, where the
eager one launches a few thousand kernels. Its outputs are copied out of the graph's memory
before they are returned. compiled=True: such a call runs the whole forward through
torch.compile (fixed shapes: each sublayer's norms, rotary embeddings, gathers, gating and
residual adds fuse into fewer kernels), compiled once per kind and set of capacities; with both,
the compiled forward is what the graph captures. A call with a cache (a prompt before decoding)
runs eagerly, and so does the first call of a kind, which learns the counts.

What differs from compact.py, and why:
- kv="all": every token makes its query and attends with the model's own kernel
  (model.Attention.heads; on a GPU the fused causal one), and only the kept rows go through the
  output projection. The FLOP model counts the queries and scores of kept tokens only, but on an
  H200 the masked kernel over the gathered queries took 4x the fused one over all of them.
- A skip substitute (router.Substitute) runs on every row and is added where the gate is off:
  gathering the skipped rows would need a second capacity for 4*d*r FLOPs a row.
- Random gates (bench.py's, evaluate.py --gates=random) draw anew when a call runs again in
  full: its numbers are those of another draw at the same densities.
- A call that cannot compact, or that counts on the host by design, runs the model itself:
  a decoding step of batch 1 (compact.step: a branch per gate), kv="kept" with a cache (each
  layer's cache fills to its own per-sequence level, a host-side count), the training path.

On a CPU compact.py's exact compaction is faster (no padding rows, blocks of queries): this file
is for a GPU (RESULTS.md, "On a GPU"). The model code does not know about it: for the length of a
call, compact.kept_rows, skipped_rows and attention are swapped for the fixed-capacity versions
here (and back after, even on error), as compiled.py swaps in its compiled rows.
"""
import math
from contextlib import contextmanager

import torch

import compact
import lora
import router

ROWS = 64        # capacities are multiples of ROWS rows (or all of them)
RECOMPILE_LIMIT = 64   # compiled: kinds of call x sets of capacities torch._dynamo may keep
MARGIN = 4.0     # a capacity's margin over a kept count, in sqrt(count)


def capacity_for(count: int, rows: int) -> int:
    """The capacity of a sublayer of `rows` rows that kept `count` of them: count + MARGIN sqrt(count),
    rounded up to a multiple of ROWS, at most rows."""
    return min(rows, max(ROWS, math.ceil((count + MARGIN * math.sqrt(count)) / ROWS) * ROWS))


def settle(capacity: int, count: int, rows: int) -> int:
    """A sublayer's capacity after a call that kept `count`: it grows past an overflow, shrinks when
    4 ROWS too roomy (far more than random gates' counts move), and otherwise stays: a new capacity
    is a new CUDA graph to capture (~3 calls' time)."""
    want = capacity_for(count, rows)
    return want if count > capacity or want <= capacity - 4 * ROWS else capacity


def kept_first(keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, C) positions along dim 1 of keep (B, T) bool: its kept tokens in order, then its
    earliest skipped ones, C = capacity of them. A stable sort: no count, no read back."""
    return torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :capacity]


class Run:
    """One call's fixed-capacity sublayers: the capacities it runs at, in call order (None: all
    rows), and the kept count of every routed sublayer, recorded on the device."""

    def __init__(self, capacities=None):
        self.capacities, self.counts, self.rows = capacities, [], []

    def capacity(self, count: torch.Tensor, rows: int) -> int:
        """Record a sublayer's kept count (a 0-dim tensor) out of `rows`; its capacity this call."""
        i = len(self.counts)
        self.counts.append(count)
        self.rows.append(rows)
        return rows if self.capacities is None else min(rows, self.capacities[i])

    def kept_rows(self, f, h, x, keep):
        """compact.kept_rows at a fixed capacity: h + f(x) where keep is True."""
        B, T, d = x.shape
        flat = keep.reshape(1, B * T)                                     # every sequence's rows together
        C = self.capacity(flat.sum(), B * T)
        if C == B * T:                                                    # every row: no gather
            return h + torch.where(keep[..., None], f(x), 0)
        rows = kept_first(flat, C)[0]                                     # (C,) flat rows
        y = torch.where(flat[0, rows, None], f(compact.gather_rows(x, rows)), 0)    # (C, d)
        return compact.scatter_add_rows(h, rows, y)

    def skipped_rows(self, skip, h, x, keep):
        """compact.skipped_rows on every row: h + skip(x) where keep is False."""
        return h if skip is None else h + torch.where(keep[..., None], 0, skip(x))

    def attention(self, a, out, h, x, keep, cos, sin, pos, cache, kv: str):
        """compact.attention at a fixed capacity per sequence (kv="kept": no cache)."""
        B, T, d = x.shape
        C = self.capacity(keep.sum(1).amax(), T)                          # the fullest sequence's count
        # kv="all": every token asks, with the model's own kernel (on a GPU the fused causal one,
        # several times faster than a masked one over the kept queries); only kept rows go through wo
        heads = a.heads(x, cos, sin, pos, cache) if kv == "all" else None    # (B, T, H*D)
        if heads is not None and C == T:
            return h + torch.where(keep[..., None], out(a.wo(heads)), 0)
        t_idx = kept_first(keep, C)                                       # (B, C) positions
        valid = keep.gather(1, t_idx)                                     # (B, C) kept, not padding
        if heads is not None:
            y = heads.gather(1, t_idx[..., None].expand(-1, -1, heads.shape[2]))   # (B, C, H*D)
        else:                                            # kv="kept": the kept rows are queries and keys
            xp = x.gather(1, t_idx[..., None].expand(-1, -1, d))          # (B, C, d)
            cos_p, sin_p, q_pos = cos[0][t_idx], sin[0][t_idx], pos.gather(1, t_idx)   # (B, C, D), (B, C)
            q, (k, v) = a.project_q(xp, cos_p, sin_p), a.project_kv(xp, cos_p, sin_p)
            mask = a.mask(q_pos, q_pos, valid) | ~valid[:, None, :, None]    # padded query: no all-masked row
            y = a.attend(q, k, v, mask)                                   # (B, C, H*D)
        y = torch.where(valid[..., None], out(a.wo(y)), 0)                # (B, C, d): padding adds 0
        return h.scatter_add(1, t_idx[..., None].expand(-1, -1, d), y.to(h.dtype))

    def read(self) -> list:
        """The recorded kept counts as Python ints: the call's one read back (a sync)."""
        return torch.stack(self.counts).tolist() if self.counts else []


@contextmanager
def swapped(run: Run):
    """compact.kept_rows, skipped_rows and attention are run's inside the block, compact's own after."""
    names = ("kept_rows", "skipped_rows", "attention")
    own = {name: getattr(compact, name) for name in names}
    try:
        for name in names:
            setattr(compact, name, getattr(run, name))
        yield run
    finally:
        for name, fn in own.items():
            setattr(compact, name, fn)


MODES = ("eager", "graph", "compiled", "compiled-graph")   # --capacity: how a call at fixed capacities runs


def check_mode(mode: str, device: str):
    """--capacity=mode on --device=device, or a clear error ("" is off)."""
    if mode and mode not in MODES:
        raise ValueError(f"--capacity={mode}: choose one of {', '.join(MODES)} (or leave it empty: off)")
    if mode.endswith("graph") and not device.startswith("cuda"):
        raise ValueError(f"--capacity={mode} captures CUDA graphs: use --device=cuda, or --capacity=eager or compiled")


class Capacity:
    """A model whose compacted calls run at fixed capacities (see the top of this file). Callable
    like the model, and any other attribute is the model's."""

    def __init__(self, model, graph: bool = False, compiled: bool = False, backend: str = "inductor"):
        device = model.tok_emb.weight.device
        if graph and device.type != "cuda":
            raise ValueError(f"--capacity=graph captures CUDA graphs, and the model is on {device}: "
                             "use --capacity=eager or compiled, or --device=cuda")
        self.model, self.cfg, self.graph = model, model.cfg, graph
        self.capacities = {}   # call kind -> the capacity of every routed sublayer, in call order
        self.graphs = {}       # call kind -> (capacities, CUDA graph, static input, static outputs)
        # compiled: a call without a cache runs the whole forward through torch.compile, at its
        # capacities (fixed shapes): the row-wise ops of every sublayer fuse. It compiles once per
        # kind of call and set of capacities (backend="aot_eager": the tests' quick trace)
        self.compiled = torch.compile(self.at_capacities, dynamic=False, backend=backend) if compiled else None
        if compiled:
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)

    @classmethod
    def for_mode(cls, model, mode: str):
        """The Capacity of a --capacity mode (MODES)."""
        return cls(model, graph=mode.endswith("graph"), compiled=mode.startswith("compiled"))

    def __getattr__(self, name):   # only for names this object does not have: the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, idx, cache=None, routers_off=False, last_only=False, return_hidden=False, masked=False, **kw):
        """model(idx, ...): (logits or hidden states, gate records), the compacted path's."""
        B, T = idx.shape
        step = cache is not None and T == 1 and cache.batch_size == 1
        kept_cache = cache is not None and self.cfg.kv == "kept"
        flags = dict(routers_off=routers_off, last_only=last_only, return_hidden=return_hidden)
        plain = not (self.graph or self.compiled)         # eager: nothing to fuse or capture
        # the model itself: training, a batch-1 step, a kv="kept" cache, or a dense call in eager mode
        if masked or kw or torch.is_grad_enabled() or step or kept_cache or (routers_off and plain):
            return self.model(idx, cache=cache, masked=masked, **flags, **kw)
        # a kind of call: its shape, its flags, which routers and substitutes decide (bench.py swaps them)
        gates = () if routers_off else tuple(id(m) for b in self.model.layers
                                             for m in (b.attn_router, b.mlp_router, b.attn_skip, b.mlp_skip))
        adapters = tuple((m.enabled, m.merged) for m in lora.adapters(self.model))     # a graph holds their branch
        kind = (B, T, cache is None, gates, adapters) + tuple(flags.values())
        fast = cache is None and not plain       # graphed or compiled
        if kind not in self.capacities:         # the first call of its kind runs in full: it learns the counts
            out, counts, rows = self.run(kind, idx, cache, flags, None, fast=False)
            self.capacities[kind] = [capacity_for(n, r) for n, r in zip(counts, rows)]
            if not fast:
                return out
        capacities = self.capacities[kind]
        rewind = None if cache is None else ([(list(c.lengths), list(c.deferred)) for c in cache.layers], cache.seen)
        out, counts, rows = self.run(kind, idx, cache, flags, capacities, fast)
        if any(n > c for n, c in zip(counts, capacities)):
            if cache is not None:               # a sublayer kept more than it could: once more, in full
                for c, (lengths, deferred) in zip(cache.layers, rewind[0]):
                    c.lengths, c.deferred = lengths, deferred
                cache.seen = rewind[1]
            out, counts, rows = self.run(kind, idx, cache, flags, None, fast=False)
        self.capacities[kind] = [settle(c, n, r) for c, n, r in zip(capacities, counts, rows)]
        return out

    def run(self, kind, idx, cache, flags, capacities, fast):
        """One call at these capacities (None: in full): the model's output, the kept counts as
        Python ints (the call's one read back), and each routed sublayer's rows. fast: graphed or
        compiled, as this object says (a call without a cache); else eager."""
        if fast and self.graph:
            return self.replay(kind, idx, flags, capacities)
        run = Run(capacities)
        out = (self.compiled if fast else self.at_capacities)(idx, cache, flags, run)
        return out, run.read(), run.rows

    def at_capacities(self, idx, cache, flags, run):
        """The model's forward with run's fixed-capacity sublayers (what `compiled` compiles)."""
        with swapped(run):
            return self.model(idx, cache=cache, **flags)

    def replay(self, kind, idx, flags, capacities):
        """run() as a CUDA graph, captured on the first call of its kind and capacities."""
        if kind not in self.graphs or self.graphs[kind][0] != capacities:
            self.graphs.pop(kind, None)                        # its memory goes before a new one is taken
            self.graphs[kind] = (capacities,) + self.capture(idx.clone(), flags, capacities)
        _, graph, static, (out, records), counts, rows = self.graphs[kind]
        static.copy_(idx)
        graph.replay()
        records = [router.GateRecord(r.layer, r.kind, r.z.clone(), r.keep.clone()) for r in records]
        return (out.clone(), records), (counts.tolist() if counts is not None else []), rows

    def capture(self, static, flags, capacities):
        """(graph, static input, static (logits, records), static counts or None, rows) of one call."""
        def call():
            run = Run(capacities)
            out = (self.compiled or self.at_capacities)(static, None, flags, run)
            return out, (torch.stack(run.counts) if run.counts else None), run.rows
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                          # warm-up: lazy set-ups run outside the graph
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, counts, rows = call()
        return graph, static, out, counts, rows
