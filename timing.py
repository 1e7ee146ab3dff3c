"""timing.py — wall-clock of a model's gates against the same model dense, interleaved.

    clock = make_clock("wall", "cuda")                         # waits for the GPU before each reading
    rows = bench_gates(model, plan, "random", ids, clock)      # [prefill rows..., decode row]
    print(HEADER); print_row(rows[0])

What bench.py and `python -m research.suite` share. Both paths run in the same process on the
same weights: the dense path is model(idx, routers_off=True), the sparse path the compacted
default, where a skipped sublayer is not computed. plan holds prefill (BATCHxSEQ_LEN shapes),
decode_batch, prompt_len, new_tokens and repeat:
- prefill: one forward over (batch x seq_len) tokens, logits at every position;
- decode:  new_tokens greedy steps of one token through a KV cache after a prompt of
           prompt_len tokens (the prefill is not timed).
Each row gives the measured density, dense_s and sparse_s (medians over repeat runs, dense and
sparse interleaved so that a noisy neighbour hits both), speedup = dense_s / sparse_s,
ideal_speedup = 1 / flops.compute_ratio at the measured per-sublayer densities and the real
context, and efficiency = speedup / ideal_speedup (1 = every skipped FLOP turned into saved time).

Every timed function takes the clock it reads (a callable giving seconds): make_clock picks it.
"""
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

import router
from flops import compute_ratio
from generate import now


def make_clock(kind: str = "wall", device: str = "cpu"):
    """The clock to time with: "wall" (time.perf_counter) or "cpu" (this process's CPU seconds:
    steadier on a shared machine); on a GPU, wall seconds after waiting for its queued work."""
    if torch.device(device).type == "cuda":
        return partial(now, device)
    return time.process_time if kind == "cpu" else time.perf_counter


def where(device: str, threads: int) -> str:
    """What the timings ran on: the GPU's name, or the CPU threads, OpenMP's wait policy and any
    setting of glibc's allocator (MALLOC_*, GLIBC_TUNABLES; see bench.py)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    env = [f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"]
    env += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    return f"{threads} threads ({', '.join(env)})"


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def token_ids(tok, path: str, n: int) -> torch.Tensor:
    """The first n token ids of a text file (repeated if the text is shorter), as (n,)."""
    if not Path(path).is_file():
        raise ValueError(f"--text={path} is not a file: pass a UTF-8 text file")
    try:
        ids = tok.encode(Path(path).read_text(encoding="utf-8"), special=False)
    except UnicodeDecodeError as e:
        raise ValueError(f"--text={path} is not UTF-8 text ({e.reason}): pass a UTF-8 text file") from None
    if not ids:
        raise ValueError(f"--text={path} holds no tokens: pass a longer text file")
    ids = torch.tensor(ids * (n // len(ids) + 1))
    return ids[:n]


def parse_shape(spec: str):
    """'4x256' -> (4, 256)."""
    try:
        b, t = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--prefill item {spec!r} is not BATCHxSEQ_LEN (e.g. 1x1024)") from None
    if b < 1 or t < 1:
        raise ValueError(f"--prefill item {spec!r} needs a positive batch and length")
    return b, t


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def interleaved(run_dense, run_sparse, repeat: int):
    """Median seconds of two timed callables run alternately (after one warm-up of each).

    Each callable returns (seconds, gate records); the sparse records of every run are kept.
    """
    run_dense(), run_sparse()
    dense_s, sparse_s, records = [], [], []
    for _ in range(repeat):
        dense_s.append(run_dense()[0])
        s, recs = run_sparse()
        sparse_s.append(s)
        records += recs
    return statistics.median(dense_s), statistics.median(sparse_s), records


@torch.inference_mode()
def prefill_run(model, idx, dense: bool, clock=time.perf_counter):
    t0 = clock()
    _, records = model(idx, routers_off=dense)                                # logits at every position
    return clock() - t0, records


@torch.inference_mode()
def decode_pair(model, prompt, new_tokens: int, clock=time.perf_counter, paths=None):
    """Greedy decoding with a KV cache, two paths in lockstep: each one-token step of one path
    is followed by the same step of the other (the order alternates), so that noise from a busy
    machine falls on both. The prefill of the prompt is not timed.

    paths: the two (model, routers_off) to compare; default the dense (model, True) against the
    sparse (model, False). A model is anything callable like model.Model (compiled.Compiled).
    Returns (first path's seconds, second path's seconds, second path's gate records of the timed steps).
    """
    B, T = prompt.shape
    paths = paths or ((model, True), (model, False))
    caches = [m.new_cache(B, T + new_tokens) for m, _ in paths]
    nxt = [m(prompt, cache=c, routers_off=off, last_only=True)[0] for (m, off), c in zip(paths, caches)]
    seconds, records = [0.0, 0.0], []
    for step in range(new_tokens):
        for i in ((0, 1) if step % 2 else (1, 0)):
            (m, off), x = paths[i], nxt[i][:, -1].argmax(-1, keepdim=True)        # (B, 1) greedy
            t0 = clock()
            nxt[i], recs = m(x, cache=caches[i], routers_off=off, last_only=True)
            seconds[i] += clock() - t0
            if i == 1:
                records += recs
    return seconds[0], seconds[1], records


def decode_runs(model, prompt, new_tokens: int, repeat: int, clock=time.perf_counter, paths=None):
    """Medians over `repeat` decode_pair runs (after a short warm-up)."""
    decode_pair(model, prompt, min(new_tokens, 4), clock, paths)
    runs = [decode_pair(model, prompt, new_tokens, clock, paths) for _ in range(repeat)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
            [rec for r in runs for rec in r[2]])


def row(model, mode, gates, B, seq_len, queries, dense_s, sparse_s, records) -> dict:
    """One result: the timings, the measured density (over the routed sublayers) and what the
    FLOP model promises."""
    stats = router.GateStats(records)
    ratio = compute_ratio(model.cfg, seq_len, stats.density(), model.cfg.kv, queries)
    speedup = dense_s / sparse_s
    return dict(mode=mode, kv=model.cfg.kv, gates=gates, density=stats.mean(),
                batch=B, seq_len=seq_len, new_tokens=queries if mode == "decode" else None,
                dense_s=dense_s, sparse_s=sparse_s, speedup=speedup, ideal_speedup=1 / ratio,
                efficiency=speedup * ratio)


def timed_pairs(plan, ids: torch.Tensor, paths, clock=time.perf_counter):
    """Two paths ((model, routers_off), (model, routers_off)) timed against each other on every
    prefill shape of the plan, then in decoding: yields (mode, batch, seq_len, queries (None for a
    prefill), first path's seconds, second path's seconds, second path's gate records)."""
    (first, first_off), (second, second_off) = paths
    for spec in plan["prefill"]:
        B, T = parse_shape(spec)
        idx = ids[: B * T].view(B, T)
        a, b, recs = interleaved(lambda: prefill_run(first, idx, first_off, clock),
                                 lambda: prefill_run(second, idx, second_off, clock), plan["repeat"])
        yield "prefill", B, T, None, a, b, recs
    B, P, n = plan["decode_batch"], plan["prompt_len"], plan["new_tokens"]
    a, b, recs = decode_runs(first, ids[: B * P].view(B, P), n, plan["repeat"], clock, paths)
    yield "decode", B, P + n, n, a, b, recs


def bench_gates(model, plan, gates: str, ids: torch.Tensor, clock=time.perf_counter) -> list:
    """Prefill and decode rows for the gates the model has now (plan: see the top of this file)."""
    out = []
    for mode, B, seq_len, queries, d, s, recs in timed_pairs(plan, ids, ((model, True), (model, False)), clock):
        out.append(row(model, mode, gates, B, seq_len, queries, d, s, recs))
        print_row(out[-1])
    return out


def compiled_rows(model, fast, plan, ids: torch.Tensor, clock=time.perf_counter) -> list:
    """The dense model eager (model) against compiled (fast, a compiled.Compiled of it), run
    alternately: a row per prefill shape and one for decoding, whose dense_s is the eager path's,
    sparse_s the compiled one's, and speedup what compiling gains (ideal 1: the same FLOPs)."""
    out = []
    for mode, B, seq_len, queries, e, c, _ in timed_pairs(plan, ids, ((model, True), (fast, True)), clock):
        out.append(dict(mode=mode, kv=model.cfg.kv, gates="compiled", density=1.0, batch=B, seq_len=seq_len,
                        new_tokens=queries, dense_s=e, sparse_s=c, speedup=e / c, ideal_speedup=1.0,
                        efficiency=e / c, compares="eager dense (dense_s), compiled dense (sparse_s)"))
        print_row(out[-1])
    return out


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def print_row(r: dict):
    if r.get("density") is None:   # a research/vs_hf.py row: ours against transformers
        print(f"{r['mode']:8s} {r['batch']:>3d} x {r['seq_len']:<5d} ours {r['ours_s']:8.3f} s   "
              f"transformers {r['hf_s']:8.3f} s   speedup {r['speedup']:5.2f}x"
              + (f"   same tokens: {r['same_tokens']}" if "same_tokens" in r else ""))
        return
    shape = f"{r['batch']} x {r['seq_len']}" + (f" (+{r['new_tokens']})" if r["new_tokens"] else "")
    print(f"{r['mode']:8s} {r['kv']:5s} {r['gates']:8s} {r['density']:7.3f} {shape:>16s} {r['dense_s']:9.3f} "
          f"{r['sparse_s']:9.3f} {r['speedup']:8.2f} {r['ideal_speedup']:6.2f} {r['efficiency']:6.2f}")


HEADER = (f"{'mode':8s} {'kv':5s} {'gates':8s} {'density':>7s} {'batch x seq_len':>16s} {'dense_s':>9s} "
          f"{'sparse_s':>9s} {'speedup':>8s} {'ideal':>6s} {'eff':>6s}")
