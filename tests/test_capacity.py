"""--capacity: capacity.py's fixed-capacity prefills give the compacted path's logits and tokens,
and read nothing back from the device until the call ends.

    python -m pytest tests/test_capacity.py -q

The routers are real ones with random weights (test_compiled.routed), so the gates depend on the
hidden state. Capacities are made tight (ROWS=1, no margin), so that a tiny model compacts for
real: a call at exactly the counts it saw, one with padding rows, and one where a sublayer keeps
more than its capacity and the call runs again in full.
"""
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench
import capacity
import compact
import router
from capacity import Capacity, Run, capacity_for, kept_first, settle, swapped
from test_compaction import FAMILIES, tokens
from test_compiled import routed, tiny_bench


@pytest.fixture
def tight(monkeypatch):
    """Capacities exactly at the largest count seen (multiples of 1 row, no margin)."""
    monkeypatch.setattr(capacity, "ROWS", 1)
    monkeypatch.setattr(capacity, "MARGIN", 0.0)


class Spy(Capacity):
    """Capacity that notes the capacities of every run (None: in full), and whether it ran
    compiled or graphed (fast) or eagerly."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.runs, self.fast_runs = [], []

    def run(self, kind, idx, cache, flags, capacities, fast):
        out = super().run(kind, idx, cache, flags, capacities, fast)
        self.runs.append((capacities, out[1], out[2]))          # capacities, counts, rows
        self.fast_runs.append(fast)
        return out


def below_full_capacity(monkeypatch) -> list:
    """Every Capacity's calls from now on note here whether some sublayer ran on fewer rows than
    it has (a fixed capacity below full, not a call in full)."""
    noted, own_run = [], Capacity.run

    def run(self, kind, idx, cache, flags, capacities, fast):
        out = own_run(self, kind, idx, cache, flags, capacities, fast)
        noted.append(capacities is not None and any(c < r for c, r in zip(capacities, out[2])))
        return out
    monkeypatch.setattr(Capacity, "run", run)
    return noted


def test_capacities_are_multiples_of_rows_with_a_margin_and_settle():
    assert capacity_for(0, 2048) == 64 and capacity_for(1024, 2048) == 1152   # 1024 + 4 * 32 = 1152
    assert capacity_for(1030, 2048) == 1216 and capacity_for(2000, 2048) == 2048 and capacity_for(5, 16) == 16
    assert settle(1152, 1200, 2048) == 1344                    # overflowed: grows
    assert settle(1152, 1000, 2048) == settle(1152, 1152, 2048) == 1152   # a little roomy, or full: stays
    assert settle(1152, 800, 2048) == 1152 and settle(1152, 700, 2048) == 832   # far too roomy: shrinks
    keep = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    assert kept_first(keep, 4).tolist() == [[1, 3, 4, 0], [0, 1, 2, 3]]      # kept in order, then the earliest


@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefill_at_fixed_capacities_gives_the_compacted_logits(family, kv, tight):
    model = routed(family, kv, substitute=8 if family == "llama_gqa" else None)
    fast = Spy(model)
    a, b = tokens(3, 16, seed=3), tokens(3, 16, seed=4)

    def check(idx):
        want, want_records = model(idx)
        got, records = fast(idx)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert [r.keep.tolist() for r in records] == [r.keep.tolist() for r in want_records]

    with torch.inference_mode():
        check(a)                                                  # in full: learns a's counts
        check(a)                                                  # at exactly a's counts
        (kind, caps), = fast.capacities.items()
        fast.capacities[kind] = [max(c - 2, 0) for c in caps]     # too small: a sublayer overflows
        check(a)                                                  # ... and the call runs again in full
        check(b)                                                  # at a's counts, or in full again
        fast.capacities[kind] = [min(n + 3, r) for n, r in zip(fast.runs[0][1], fast.runs[0][2])]   # roomy for a
        check(a)
    (full, *_), (exact, counts, rows) = fast.runs[0], fast.runs[1]
    assert full is None and exact == counts and any(c < r for c, r in zip(exact, rows)), "a should compact"
    (small, over, _), (rerun, *_) = fast.runs[2], fast.runs[3]
    assert any(n > c for n, c in zip(over, small)) and rerun is None
    padded, last, _ = fast.runs[-1]
    assert all(n <= c for n, c in zip(last, padded)) and any(n < c for n, c in zip(last, padded))


@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])
def test_a_prompt_into_a_cache_then_a_batch_decodes_the_same_tokens(family, kv, tight):
    """Batch 2: the prompt's prefill and every step of the batch run through Capacity (kv="kept"
    with a cache runs the model itself)."""
    model = routed(family, kv)
    prompt = tokens(2, 12, seed=6)

    def decode(m, n=8):
        cache, x, out = m.new_cache(2, 12 + n), prompt, []
        with torch.inference_mode():
            for _ in range(n):
                logits, _ = m(x, cache=cache, last_only=True)
                x = logits[:, -1].argmax(-1, keepdim=True)
                out.append(logits[:, -1])
        return torch.cat(out)

    want, fast = decode(model), Spy(model)
    for _ in range(3):                        # the second and third prompts run at their capacities
        torch.testing.assert_close(decode(fast), want, atol=1e-5, rtol=1e-5)
    if kv == "all":
        assert any(c is not None and c != r for c, _, r in fast.runs), "the prompt should compact"
    else:
        assert fast.runs == []                # kv="kept" with a cache: the model itself, as documented


@pytest.mark.parametrize("kv", router.KV_MODES)
def test_a_compiled_call_at_fixed_capacities_gives_the_compacted_logits(kv, tight, monkeypatch):
    """compiled=True traces the whole forward at its capacities (a counting backend that runs the
    traced graph: what inductor would get) once per kind and set of capacities; the logits are
    still the compacted path's, an overflow included, and the dense path is compiled too. The
    runs are read back: a compiled call does overflow its capacities, and then runs again in full."""
    torch._dynamo.reset()
    monkeypatch.setattr(compact, "QUERY_BLOCK", {})   # a sliding layer attends in one call, as on a GPU
    model = routed("gemma3", kv, substitute=4)
    counter = torch._dynamo.testing.CompileCounter()
    fast = Spy(model, compiled=True, backend=counter)
    a, b = tokens(2, 16, seed=3), tokens(2, 16, seed=4)
    with torch.inference_mode():
        for idx in (a, a, a, b, a):
            want, want_records = model(idx)
            got, records = fast(idx)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert [r.keep.tolist() for r in records] == [r.keep.tolist() for r in want_records]
        runs = list(zip(fast.runs, fast.fast_runs))
        assert runs[0][0][0] is None and not runs[0][1]                # the first call learns eagerly, in full
        compiled = [caps for (caps, _, _), fast_run in runs if fast_run]
        assert None not in compiled and len(compiled) == 5            # then every call at capacities, compiled
        (caps, counts, rows), _ = runs[1]
        assert counts == caps and any(c < r for c, r in zip(caps, rows)), "a should compact"
        overflows = [i for i, ((caps, counts, _), fast_run) in enumerate(runs)
                     if fast_run and any(n > c for n, c in zip(counts, caps))]
        assert overflows, "some compiled call should overflow its capacities"
        assert all(runs[i + 1][0][0] is None for i in overflows)      # ... and run again in full
        assert counter.frame_count == len({tuple(caps) for caps in compiled})   # one trace per set of capacities
        fast(a)                                                        # capacities settle to a's counts
        frames = counter.frame_count
        fast(a)
        assert counter.frame_count == frames and fast.fast_runs[-1]    # the same capacities: no new trace
        want = model(a, routers_off=True)[0]
        for _ in range(2):                                             # dense, compiled too: one more trace
            torch.testing.assert_close(fast(a, routers_off=True)[0], want, atol=1e-5, rtol=1e-5)
            assert fast.fast_runs[-1] and fast.runs[-1][0] == [] and counter.frame_count == frames + 1
    torch._dynamo.reset()


def test_inductors_code_at_fixed_capacities_gives_the_compacted_logits(tight):
    """The same with inductor's generated code (C++ on a CPU): one model, sparse and dense."""
    torch._dynamo.reset()
    model = routed("llama_gqa", "all", substitute=8)
    fast = Capacity(model, compiled=True)
    idx = tokens(2, 16, seed=3)
    with torch.inference_mode():
        for routers_off in (False, False, True, True):
            torch.testing.assert_close(fast(idx, routers_off=routers_off)[0], model(idx, routers_off=routers_off)[0],
                                       atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@contextmanager
def no_reads():
    """Any read of a tensor's value on the host (the device syncs of a GPU) raises inside the block:
    a read itself, a copy to the host, and an op whose output's shape depends on the values (nonzero,
    a boolean mask as an index, masked_select, repeat_interleave by a tensor, unique)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a value was read back from the device")

    def masks(index) -> bool:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                   for i in (index if isinstance(index, (tuple, list)) else (index,)))

    def unless_masked(own):
        def indexed(self, index, *value):
            return refuse() if masks(index) else own(self, index, *value)
        return indexed

    def unless_by_int(own):
        def repeated(*args, **kwargs):
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            by_tensor = repeats is None or isinstance(repeats, torch.Tensor)     # no output_size: counted
            return refuse() if by_tensor and kwargs.get("output_size") is None else own(*args, **kwargs)
        return repeated

    def unless_one_argument(own):
        return lambda *args, **kwargs: refuse() if len(args) + len(kwargs) == 1 else own(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy",
                     "__array__", "cpu", "masked_select", "unique", "unique_consecutive", "argwhere"):
            mp.setattr(torch.Tensor, name, refuse)
        for name in ("nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "equal", "allclose"):
            mp.setattr(torch, name, refuse)
        for name in ("__getitem__", "__setitem__"):
            mp.setattr(torch.Tensor, name, unless_masked(getattr(torch.Tensor, name)))
        mp.setattr(torch.Tensor, "repeat_interleave", unless_by_int(torch.Tensor.repeat_interleave))
        mp.setattr(torch, "repeat_interleave", unless_by_int(torch.repeat_interleave))
        mp.setattr(torch, "where", unless_one_argument(torch.where))
        yield


@pytest.mark.parametrize("kv", router.KV_MODES)
def test_a_fixed_capacity_call_reads_nothing_back(kv, tight, monkeypatch):
    monkeypatch.setattr(compact, "QUERY_BLOCK", {})   # a sliding layer attends in one call, as on a GPU
    model = routed("gemma3", kv, substitute=4)
    idx = tokens(2, 16, seed=3)
    with torch.inference_mode():
        run = Run()
        with swapped(run):
            model(idx)                                                     # in full
        capacities = [capacity_for(n, r) for n, r in zip(run.read(), run.rows)]
        assert any(c < r for c, r in zip(capacities, run.rows))
        run = Run(capacities)
        with swapped(run), no_reads():
            model(idx)
        with pytest.raises(AssertionError, match="read back"), no_reads():
            model(idx)                                                     # compact.py counts on the host


def test_compacts_functions_are_back_after_a_call_even_one_that_raises():
    model = routed("llama_gqa", "all")
    own = (compact.kept_rows, compact.skipped_rows, compact.attention)
    fast = Capacity(model)
    with torch.inference_mode():
        fast(tokens(1, 8))
        with pytest.raises(ValueError, match="exceed"):
            fast(tokens(1, model.cfg.max_seq_len + 1))
    assert (compact.kept_rows, compact.skipped_rows, compact.attention) == own


def test_evaluate_capacity_gives_the_eager_numbers(tiny_hf, tmp_path_factory, capsys, tight, monkeypatch):
    """evaluate.py --capacity=eager on a sparse checkpoint gives the numbers of the exact compacted
    path (its dense pass, LoRA off and routers off, is another kind of call)."""
    import evaluate
    from conftest import tiny_model_folder, word_text_file
    from test_cli import SEQ_LEN, make_checkpoint
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, "llama", False)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("capacity") / "ckpt", folder, lora_std=0.3)
    text = word_text_file(tmp_path_factory, "val", 400, seed=0)

    compacted = below_full_capacity(monkeypatch)

    def run(*argv):
        evaluate.main([f"--ckpt={ckpt}", f"--text={text}", f"--seq_len={SEQ_LEN}", "--json", *argv])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    eager, fixed = run(), run("--capacity=eager")
    assert any(compacted), "some pass should run below full capacity"
    for key in ("perplexity", "dense_perplexity", "kl_to_dense", "top1_agreement", "density", "compute_ratio"):
        assert fixed[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-7), key
    assert 0.2 < fixed["density"] < 0.8 and fixed["kl_to_dense"] > 1e-3
    # random gates draw anew in a call run again in full, so only the dense side is the same
    eager, fixed = run("--gates=random"), run("--gates=random", "--capacity=eager")
    assert fixed["dense_perplexity"] == pytest.approx(eager["dense_perplexity"], rel=1e-5)
    assert fixed["density"] == pytest.approx(eager["density"], abs=0.1)
    for bad, match in ((["--capacity=compiled-graph"], "use --device=cuda"),
                       (["--capacity=eager", "--path=masked"], "drop"),
                       (["--capacity=fast"], "choose one of eager, graph, compiled")):
        with pytest.raises(ValueError, match=match):
            evaluate.main([f"--ckpt={ckpt}", f"--text={text}", *bad])


def test_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="--capacity=graph captures CUDA graphs.*--capacity=eager"):
        Capacity(routed("llama_gqa", "all"), graph=True)


def test_bench_capacity_times_the_fixed_capacity_prefill(monkeypatch, capsys):
    compacted = below_full_capacity(monkeypatch)
    rows = tiny_bench(monkeypatch, capsys, 256, "--densities=1,0.5", "--prefill=1x256", "--prompt_len=8",
                      "--new_tokens=4", "--repeat=2", "--capacity=eager")
    assert [(r["mode"], r["density"]) for r in rows[:2]] == [("prefill", 1.0), ("decode", 1.0)]
    assert [r["mode"] for r in rows[2:]] == ["prefill", "decode"] and all(0.3 < r["density"] < 0.7 for r in rows[2:])
    assert any(compacted), "some prefill should run below full capacity"
    for bad, match in (("--capacity=fast", "choose one of eager, graph, compiled"),
                       ("--capacity=graph", "use --device=cuda"),
                       ("--compile=True", "choose one")):
        with pytest.raises(ValueError, match=match):
            bench.main(["--init=tiny-llama", "--random_weights=True", "--capacity=eager", bad]
                       if bad == "--compile=True" else ["--init=tiny-llama", "--random_weights=True", bad])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", ["llama_gqa", "gemma2"])
def test_on_a_gpu_graphs_replay_the_compacted_logits_and_nothing_syncs(family, kv, tight):
    model = routed(family, kv, substitute=8).cuda()
    calls = [tokens(3, 16, seed=s).cuda() for s in (3, 3, 4, 3, 5, 4)]
    torch._dynamo.reset()
    for graph, compiled in ((False, False), (True, False), (True, True)):   # compiled: traced, not inductor
        fast = Capacity(model, graph=graph, compiled=compiled, backend="aot_eager")
        with torch.inference_mode():
            for idx in calls:
                want, want_records = model(idx)
                got, records = fast(idx)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                assert [r.keep.tolist() for r in records] == [r.keep.tolist() for r in want_records]
                torch.testing.assert_close(fast(idx, return_hidden=True)[0], model(idx, return_hidden=True)[0],
                                           atol=1e-4, rtol=1e-4)                # scoring's passes
    assert len(fast.graphs) == 2                               # logits and hidden states: two kinds
    run = Run(next(iter(fast.capacities.values())))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")                    # a device sync raises
    try:
        with torch.inference_mode(), swapped(run):
            model(calls[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
