"""compiled.py — --compile (sample.py, bench.py, evaluate.py): the model through torch.compile.

In eager PyTorch every op costs a fixed overhead, and a decoding step of batch 1 is hundreds of
small ops: at density 1 the routers alone (an op and a read each, 60 of them) cost ~3 % of the
step. torch.compile (inductor, as gpt-fast uses it) fuses a step into a few kernels, but it
cannot follow a Python branch on a tensor's value. So this file writes the batch-1 step of
compact.step once more, with each gate as a torch.cond: both branches are compiled, and the
one the router picks runs inside the compiled step, with no return to Python per gate.

    fast = Compiled(model)                               # compiles on first use (minutes on a CPU)
    logits, records = fast(x, cache=cache, last_only=True)   # x (1, 1): the compiled step
    generate(fast, idx, 40)                                  # generate.py and timing.py take it
    logits, records = fast(idx)                              # a prefill: compiled MLPs

A forward of many tokens (a prefill into a cache, or evaluate.py's windows with none) runs
the model's own forward, the compacted path, with its MLPs compiled: an MLP takes (..., d) and
acts on every row alone, so for the length of the call it runs a compiled function on exactly
its rows, which fuses the activation with the product of its two halves. Kept counts change
with every call and every layer, so the row count is a symbolic size of the compiled code (a
dynamic shape), not a constant: one graph serves every count, and one function serves every
layer (the module is an argument: its weights are inputs of the graph, not constants), so it
compiles once (and once more with LoRA adapters on). The rest of the call (norms, routers,
gathers, attention, projections) stays eager: a lone matmul compiled is the same BLAS call
behind a compiled call's overhead (attention's output projection measured 2-17 % slower). A
decoding step of a batch and the training path (masked, or gradients on) run the model itself.
The compiled step starts from a cache that a prefill filled. Same weights, same gates, the
same logits as the eager model: tests/test_compiled.py checks it for every family and both kv
modes. model.py, router.py and compact.py do not know about this file.

On this CPU compiled dense decoding is 9-26 % faster than eager (six runs), but a skip saves
less time here than in the eager step (efficiency 0.90-0.93 against 0.94-0.96 at density 0.5),
and a compiled prefill hardly pays: its matmuls are the same BLAS calls, and the fused MLP gains
only where its (rows x hidden) intermediates outgrow the cache (-10 % at 64 rows, +9 % at 1,024;
RESULTS.md, "A compiled decoding step"); on a CPU the eager path stays the default. Where a
step's time goes (python -m research.decode_profile): its matmuls shrink as the FLOP model says,
but each call's guards (~1.5-2 ms under the profiler, less in wall time) and each gate's cond
and kernels run whether the gate skips or not.

How the compiled step differs from compact.step, and why:
- A cond's branches may not write to the cache. So a token's K/V are written before its
  attention's cond: in kv="all" every token projects them (the eager step defers a skipped
  token's to the next token that computes the layer instead); in kv="kept" a cond of the same
  gate projects them only if the token keeps, else gives zeros, and they land in the slot after
  the layer's last one, where the next kept token overwrites them (the layer's fill level moves
  only when it keeps).
- The cache is read whole: the step attends over all of its slots with a mask (keys after the
  token's position, or past the layer's fill level, are hidden), so its shapes do not change
  from one step to the next. It compiles once per cache size, and Compiled.new_cache rounds
  sizes up to a multiple of 256.
"""
from contextlib import contextmanager, nullcontext
from functools import partial

import torch

import router
from model import attention_mask, rope_cos_sin


CACHE_BUCKET = 256
# Entries torch._dynamo may keep per compiled function (its recompile limit, 8 by default): the
# step compiles once per cache size and per set of gates (bench.py's forced densities and its
# dense path each make one), the MLPs once (twice with LoRA on). Past it, the MLPs run eagerly (the
# same numbers, with a warning) and the step (fullgraph) raises.
RECOMPILE_LIMIT = 64


def rowwise(module, x):
    """The module's own forward (its class's, not the compiled one swapped in) on x (..., k)."""
    return type(module).forward(module, x)


class Compiled:
    """A model whose one-token decoding steps of batch 1 run compiled, and whose prefills run the
    model with its MLPs compiled. Callable like the model, and any attribute (cfg, layers,
    tok_emb, logits, ...) is the model's: it passes for the model where scoring.py and gates.py
    read one."""

    def __init__(self, model, backend: str = "inductor"):
        # backend="aot_eager" traces the same graph without generating code: the tests' quick check
        self.model, self.cfg = model, model.cfg
        # The step's shapes are fixed (dynamic=False): a new cache size, or a model with other gates,
        # compiles it again
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        # cpp_wrapper: inductor writes the code around its kernels (the calls, each cond's branch) in
        # C++ too, not Python; a branch then costs ~nothing, and sparse steps run faster than eager
        options = dict(cpp_wrapper=True) if backend == "inductor" else None
        self.step = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=backend, options=options)
        # One function for every layer's MLP: the module is an argument, so torch._dynamo
        # guards on its type and flags (a LoRA adapter on or off), not on which layer it is; the
        # row count is marked dynamic at each call (on_rows). Not fullgraph: past the
        # recompile limit, fullgraph would make a new entry an error
        self.rows = torch.compile(rowwise, backend=backend)

    def __getattr__(self, name):   # only for names this object does not have: the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def new_cache(self, batch_size: int, max_len: int):
        """The model's cache, its length rounded up to a multiple of CACHE_BUCKET (the step reads
        all of it, masked): generations of different lengths share one compiled step."""
        size = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        return self.model.new_cache(batch_size, max(max_len, min(size, self.cfg.max_seq_len)))

    def __call__(self, idx, cache=None, routers_off=False, last_only=False, **kw):
        """model(idx, ...): the compiled step for one token of batch 1 with a cache; a step of a
        batch, or the training path (masked, or gradients on), the model itself; anything else
        (a prefill, a forward with no cache) the model with compiled MLPs."""
        if cache is not None and idx.shape == (1, 1) and cache.batch_size == 1 and not kw:
            return self.decode(idx, cache, routers_off)
        step = cache is not None and idx.shape[1] == 1      # B rows: eager (compiled, not measured)
        eager = step or kw.get("masked") or torch.is_grad_enabled()
        with nullcontext() if eager else self.compiled_mlps():
            return self.model(idx, cache=cache, routers_off=routers_off, last_only=last_only, **kw)

    @contextmanager
    def compiled_mlps(self):
        """Inside the block every block's MLP runs compiled (on_rows); after it, even on error,
        its own forward again. The swap is an instance attribute `forward`, which
        nn.Module.__call__ runs instead of the class's (hooks still fire)."""
        modules = [block.mlp for block in self.model.layers]
        try:
            for m in modules:
                m.forward = partial(self.on_rows, m)
            yield
        finally:
            for m in modules:
                vars(m).pop("forward", None)

    def on_rows(self, module, x):
        """module(x) for a row-wise module, x (..., k) -> (..., m): the compiled function on x's rows,
        their count a dynamic size. Fewer than 2 rows run eagerly: torch._dynamo specializes sizes 0
        and 1 (each would be a graph of its own)."""
        rows = x.reshape(-1, x.shape[-1])                                 # (n, k)
        if rows.shape[0] < 2:
            return rowwise(module, x)
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        y = self.rows(module, rows)                                       # (n, m)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def decode(self, idx, cache, routers_off: bool):
        """The compiled step for the one token idx (1, 1): (logits (1, 1, V), gate records)."""
        layers, start = cache.layers, cache.reserve(1)              # the context and the cache both fit
        if any(c.deferred for c in layers):
            raise ValueError("the cache holds deferred K/V (an eager step wrote it): decode it with one path")
        pos = torch.full((1, 1), start, dtype=torch.long, device=idx.device)
        levels = torch.tensor([c.lengths[0] for c in layers], device=idx.device)     # (L,) filled slots
        logits, z, kinds = self.step(self.model, idx, pos, levels, [c.k for c in layers],
                                     [c.v for c in layers], [c.pos for c in layers], routers_off)
        records = gate_records(kinds, z) if kinds else []
        kept = advanced(self.model, records)                 # how far each layer's cache moved
        for c, n in zip(layers, kept):
            c.lengths = [c.lengths[0] + n]
        cache.seen += 1
        return logits, records


def gate_records(kinds, z):
    """The step's logits z (G, 1, 1) of the routed sublayers kinds [(layer, kind)] as GateRecords."""
    return [router.GateRecord(layer, kind, zi, ki)
            for (layer, kind), zi, ki in zip(kinds, z.unbind(0), (z > router.ZERO).unbind(0))]


def routed_kinds(block):
    """The kinds whose gate this block records, in the order the step decides them."""
    if block.cfg.route == "block":
        return ("attn", "mlp") if block.attn_router is not None else ()
    return tuple(k for k, r in (("attn", block.attn_router), ("mlp", block.mlp_router)) if r is not None)


def advanced(model, records):
    """Slots each layer's cache filled in the step: 1, or in kv="kept" whether attention kept."""
    moved = [1] * model.cfg.n_layers
    attn = [r for r in records if r.kind == "attn"] if model.cfg.kv == "kept" else []
    if attn:
        for r, kept in zip(attn, torch.cat([r.keep.view(1) for r in attn]).tolist()):   # one read
            moved[r.layer] = int(kept)
    return moved


# ----------------------------------------------------------------------------------------------
# The step, as torch.compile sees it
# ----------------------------------------------------------------------------------------------

def decode_step(model, idx, pos, levels, ks, vs, kps, routers_off: bool):
    """compact.step for every block, then the head: idx, pos (1, 1); levels (L,) each layer's
    filled slots; ks, vs (1, Hkv, S, D) and kps (1, S), the layers' cache buffers, written in
    place. -> (logits (1, 1, V), router logits (G, 1, 1) of the G routed sublayers in model
    order, and their (layer, kind): a constant of the compiled code, not read from the model per
    step, which costs a decoding step ~0.3 % in Python)."""
    cfg = model.cfg
    h = model.tok_emb(idx)                                                # (1, 1, d)
    if cfg.embed_scale:
        h = h * torch.tensor(cfg.dim ** 0.5, dtype=h.dtype)
    rope = {s: rope_cos_sin(model.inv_freq(s, idx.device), pos, h.dtype) for s in (False, True)}
    sink = idx == cfg.bos_id if cfg.sinks and cfg.bos_id is not None else None    # BOS always computes
    zs = []
    for block, level, k_cache, v_cache, k_pos in zip(model.layers, levels, ks, vs, kps):
        h = block_step(block, h, pos, rope, level, k_cache, v_cache, k_pos, sink, routers_off, zs)
    logits = model.logits(model.norm(h))
    kinds = [] if routers_off else [(b.layer, kind) for b in model.layers for kind in routed_kinds(b)]
    return logits, (torch.stack(zs) if zs else h.new_zeros(0, 1, 1)), kinds


def block_step(block, h, pos, rope, level, k_cache, v_cache, k_pos, sink, routers_off, zs):
    """One block for the one token h (1, 1, d); appends its router logits to zs."""
    a, kv = block.attn, block.cfg.kv
    cos, sin = rope[a.window is not None]                                 # (1, 1, D)
    x = block.attn_norm(h)
    z = logit(block, "attn", x, sink, routers_off)                        # (1, 1) or None
    slot = (pos[0] if kv == "all" else level.view(1))                     # (1,) where its K/V go
    if kv == "kept" and z is not None:    # a skipped token leaves no K/V: project them only if kept
        k, v = torch.cond(keeps(z), partial(kv_rows, a, cos, sin), partial(no_kv_rows, a), (x,))
    else:
        k, v = kv_rows(a, cos, sin, x)
    k_cache.index_copy_(2, slot, k.unsqueeze(2))                          # k, v (1, Hkv, D)
    v_cache.index_copy_(2, slot, v.unsqueeze(2))
    k_pos.index_copy_(1, slot, pos)
    S = k_cache.shape[2]
    if kv == "all":    # key s is the token at position s; the causal mask hides the empty slots
        keys_at, valid = torch.arange(S, device=h.device)[None], None
    else:              # the layer's kept tokens fill its slots in order; this one sits at `slot`
        keys_at, valid = k_pos, torch.arange(S, device=h.device)[None] <= level

    def attend(h, x):
        q = a.project_q(x, cos, sin)                                      # (1, H, 1, D)
        y = a.attend(q, k_cache, v_cache, attention_mask(pos, keys_at, a.window, valid))
        return h + block.attn_post_norm(a.wo(y))

    h = branch(z, attend, block.attn_skip, h, x, zs)
    x = block.mlp_norm(h)
    if block.cfg.route == "block":
        if z is not None:
            zs.append(z)                                                  # one gate, recorded as both
    else:
        z = logit(block, "mlp", x, sink, routers_off)
    return branch(z, lambda h, x: h + block.mlp_post_norm(block.mlp(x)), block.mlp_skip, h, x,
                  zs if block.cfg.route != "block" else None)


def kv_rows(a, cos, sin, x):
    """The one token x (1, 1, d)'s k, v (1, Hkv, D), contiguous (a cond's branches must agree)."""
    k, v = a.project_kv(x, cos, sin)                                      # (1, Hkv, 1, D)
    return k.reshape(1, a.Hkv, a.D).clone(), v.reshape(1, a.Hkv, a.D).clone()


def no_kv_rows(a, x):
    """kv_rows of a token that skips in kv="kept": zeros, for a slot the layer's next kept token overwrites."""
    return x.new_zeros(1, a.Hkv, a.D), x.new_zeros(1, a.Hkv, a.D)


def logit(block, kind, x, sink, routers_off):
    """The router logit (1, 1) of the one token x (1, 1, d) (router.decide), or None: no gate."""
    if routers_off:              # before reading the router: the dense step never recompiles for one
        return None
    g = router.decide(getattr(block, f"{kind}_router"), x, block.layer, kind, sink=sink)
    return None if g is None else g.z


def keeps(z):
    """The gate z (1, 1) as a cond's predicate (a 0-d bool): the token computes (router.decide's rule)."""
    return (z > router.ZERO).view(())


def branch(z, compute, skip, h, x, zs):
    """compute(h, x) where the gate z keeps the token, else h + skip(x) (or h): a torch.cond."""
    if z is None:
        return compute(h, x)
    if zs is not None:
        zs.append(z)
    skipped = (lambda h, x: h + skip(x)) if skip is not None else (lambda h, x: h.clone())
    return torch.cond(keeps(z), compute, skipped, (h, x))
