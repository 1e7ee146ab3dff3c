"""--compile: compiled.py gives the eager model's tokens, logits and gates.

    python -m pytest tests/test_compiled.py -q

The routers are real ones with random weights, so the gates depend on the hidden state and both
branches of every torch.cond run. Checked: the compiled decoding step against the eager step (in
kv="kept" a skipped token projects no K/V), and a prefill or a batch with compiled MLPs (the row
count a dynamic size) against the eager compacted path, with one graph for every kept count and
layer, the model's own modules back after every call, and evaluate.py --compile. Most checks
trace with backend="aot_eager" (the graph torch.compile captures, without generating code:
seconds); four run inductor's generated code (C++, minutes in all): one model sparse and dense,
decoding and a prefill, sample.py --compile and bench.py --compile on tiny models.
"""
import importlib
import json
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench
import compiled
import evaluate
import router
from compiled import Compiled
from model import MLP, PRESETS, ModelConfig
from test_compaction import FAMILIES, tiny_model, tokens


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Every test compiles anew: no entry of an earlier test's models is reused or counts."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def routed(family, kv, route="sublayer", substitute=None, seed=1):
    """A tiny model of the family with random routers, each keeping about half of the tokens,
    and, when asked, random skip substitutes."""
    model = tiny_model(family)
    router.add_routers(model, route, kv, substitute=substitute)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, r in router.routers(model):
            r.proj.weight.normal_(0, 1.0, generator=g)
            r.proj.bias.zero_()
        for _, _, s in router.substitutes(model):
            for p in s.parameters():
                p.normal_(0, 0.3, generator=g)
        _, records = model(tokens(1, 16, seed=5))               # centre each router on the median token
        for r in records:
            block = model.layers[r.layer]
            if block.cfg.route != "block" or r.kind == "attn":
                getattr(block, f"{r.kind}_router").proj.bias.sub_(r.z[0, 1:].median())
    return model


def greedy(step, model, prompt, n, routers_off=False):
    """Greedy decoding through step (the model, or its Compiled): tokens, last logits, the
    decisions of every one-token step, and the cache it filled."""
    cache = step.new_cache(1, prompt.shape[1] + n)                  # Compiled: a longer one
    x, ids, logits, keeps = prompt, [], [], []
    with torch.inference_mode():
        for i in range(n):
            out, records = step(x, cache=cache, routers_off=routers_off, last_only=True)
            x = out[:, -1].argmax(-1, keepdim=True)
            ids.append(int(x))
            logits.append(out[:, -1])
            if i:
                keeps.append([(r.layer, r.kind, bool(r.keep)) for r in records])
    return ids, torch.cat(logits), keeps, cache


def assert_same_decoding(model, backend, n=10, routers_off=False):
    prompt = tokens(1, 5)
    want_ids, want_logits, want_keeps, want_cache = greedy(model, model, prompt, n, routers_off)
    got_ids, got_logits, got_keeps, got_cache = greedy(Compiled(model, backend), model, prompt, n, routers_off)
    assert got_ids == want_ids
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    assert got_keeps == want_keeps
    flat = [k for step in want_keeps for _, _, k in step]
    if not routers_off:
        assert any(flat) and not all(flat), "the test's gates should both keep and skip"
    for want, got in zip(want_cache.layers, got_cache.layers):     # eager: written or deferred
        assert got.lengths == [want.lengths[0] + len(want.deferred)]
        n_filled = got.lengths[0]
        if model.cfg.kv == "kept":                                  # the same tokens, in the same slots
            torch.testing.assert_close(got.k[:, :, :n_filled], want.k[:, :, :n_filled])
    assert want_cache.layers[0].k.shape[2] == 15 and got_cache.layers[0].k.shape[2] == model.cfg.max_seq_len


@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_the_compiled_step_decodes_as_the_eager_one(family, kv):
    assert_same_decoding(routed(family, kv), "aot_eager")


@pytest.mark.parametrize("route,kv,substitute,seed", [("sublayer", "all", 4, 1), ("sublayer", "kept", 0, 1),
                                                      ("block", "all", 4, 6), ("attn", "kept", None, 2),
                                                      ("mlp", "all", 4, 2)])
def test_routes_and_substitutes(route, kv, substitute, seed):
    assert_same_decoding(routed("gemma3", kv, route, substitute, seed), "aot_eager")


def step_graph(model):
    """The graph torch._dynamo captures for the model's compiled decoding step (a few steps decoded)."""
    graphs = Graphs()
    greedy(Compiled(model, graphs), model, tokens(1, 5), 3)
    (step,) = [g for g in graphs.graphs if any(n.target is torch.ops.higher_order.cond for n in g.graph.nodes)]
    return step


def kv_projections(graph):
    """The layers' K and V projections that graph calls itself (not in a cond's branch): the names
    of their weights."""
    return [n.args[1].name for n in graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear
            and re.search(r"attn_modules_w[kv]_", n.args[1].name)]


def test_in_kv_kept_only_a_token_that_keeps_projects_its_kv():
    """kv="kept": a skipped token's K/V are never read, so they are projected in the gate's cond
    (kv="all": every token projects them, before its gate)."""
    for kv, outside in (("all", 4), ("kept", 0)):                  # 2 layers, K and V
        step = step_graph(routed("llama_gqa", kv))
        assert len(kv_projections(step.graph)) == outside
        branches = [m.graph for name, m in step.named_children() if name.startswith("cond")]
        assert sum(len(kv_projections(g)) for g in branches) == 4 - outside


def test_routers_off_is_the_dense_model():
    assert_same_decoding(routed("gemma2", "all"), "aot_eager", routers_off=True)


def test_inductors_code_decodes_and_prefills_as_the_eager_model():
    model = routed("gemma2", "kept", substitute=4)          # soft-capping, a window, kv="kept", substitutes
    assert_same_decoding(model, "inductor")
    assert_same_decoding(model, "inductor", routers_off=True)
    assert_same_prefill(model, "inductor")


def test_the_training_path_and_a_step_of_a_batch_run_the_model_itself():
    model = routed("llama_gqa", "all")
    fast = Compiled(model, backend=lambda *a: pytest.fail("compiled the training path or a step of batch 2"))
    idx = tokens(2, 6)
    with torch.no_grad():
        want, _ = model(idx, masked=True)
        got, _ = fast(idx, masked=True)
        assert torch.equal(got, want)
        caches = model.new_cache(2, 8), model.new_cache(2, 8)
        model(idx, cache=caches[0]), model(idx, cache=caches[1])
        want, got = model(tokens(2, 1), cache=caches[0])[0], fast(tokens(2, 1), cache=caches[1])[0]
        assert torch.equal(got, want)
    got, _ = fast(idx)                                              # gradients on
    assert got.requires_grad and torch.equal(got.detach(), model(idx)[0].detach())


def test_a_cache_with_deferred_kv_is_refused():
    model = routed("llama_gqa", "all")
    cache = model.new_cache(1, 20)
    with torch.inference_mode():
        model(tokens(1, 5), cache=cache)
        for _ in range(6):                                          # eager steps: some skip and defer
            model(tokens(1, 1, seed=len(cache.layers[0].deferred)), cache=cache)
        assert any(c.deferred for c in cache.layers), "no eager step deferred its K/V: the check below tests nothing"
        with pytest.raises(ValueError, match="deferred K/V"):
            Compiled(model, "aot_eager")(tokens(1, 1), cache=cache)


def test_a_step_past_the_cache_or_the_context_is_refused():
    """compiled.decode checks through KVCache.reserve, as the eager forward does."""
    model = routed("llama_gqa", "all")
    T = model.cfg.max_seq_len
    for size, message in ((8, "KV cache full: 8 \\+ 1 tokens > its 8 slots"),
                          (T, f"{T + 1} tokens exceed the model's context of {T}")):
        cache = model.new_cache(1, size)
        with torch.inference_mode():
            model(tokens(1, size), cache=cache)
            with pytest.raises(ValueError, match=message):
                Compiled(model, "aot_eager")(tokens(1, 1), cache=cache)
        assert cache.seen == size


# ----------------------------------------------------------------------------------------------
# A prefill or a batch: the MLPs compiled on their rows
# ----------------------------------------------------------------------------------------------

class Graphs:
    """A torch.compile backend that keeps the graphs it is given (graphs; count, how many) and
    counts the calls of their compiled code (calls), compiling each with backend."""

    def __init__(self, backend="aot_eager"):
        self.backend, self.graphs, self.calls = torch._dynamo.lookup_backend(backend), [], 0

    @property
    def count(self):
        return len(self.graphs)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        run = self.backend(gm, example_inputs)

        def counted(*args):
            self.calls += 1
            return run(*args)
        return counted


def assert_same_prefill(model, backend):
    """Batch 2 through the model and through its Compiled, with no cache, dense, and with a cache
    (two prefills): the same logits and gates, and one graph of the MLP for all the row counts
    the calls met."""
    graphs = Graphs(backend)
    fast, idx = Compiled(model, graphs), tokens(2, 64, seed=3)     # 128 rows
    caches = model.new_cache(2, 64), model.new_cache(2, 64)         # the eager model's, the Compiled's
    calls = [(idx, False, None, None), (idx, True, None, None),     # sparse, dense
             (idx[:, :40], False, *caches), (idx[:, 40:], False, *caches)]      # a prefill, then more
    counts = set()
    with torch.inference_mode():
        for x, routers_off, want_cache, got_cache in calls:
            want, want_records = model(x, cache=want_cache, routers_off=routers_off)
            got, got_records = fast(x, cache=got_cache, routers_off=routers_off)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert [(r.layer, r.kind) for r in got_records] == [(r.layer, r.kind) for r in want_records]
            assert all(torch.equal(g.keep, w.keep) for g, w in zip(got_records, want_records))
            assert router.GateStats(got_records).mean() == router.GateStats(want_records).mean()
            counts |= ({int(r.keep.sum()) for r in want_records} if not routers_off else {x.numel()})
        records = model(idx)[1]
    assert any(len(set(r.keep.sum(1).tolist())) > 1 for r in records), "the sequences should keep unlike counts"
    assert any(not r.keep.all() for r in records)
    assert len(counts) >= 10 and graphs.count == 1                  # not one per layer or per kept count
    for block in model.layers:                                      # the model's own modules again
        assert "forward" not in vars(block.mlp)


@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefill_with_compiled_rows_gives_the_eager_logits(family, kv):
    assert_same_prefill(routed(family, kv, substitute=4), "aot_eager")


def test_one_graph_serves_every_row_count_and_layer():
    """Row counts 70, 100 and 130 in both layers: one MLP graph; 0 or 1 rows eagerly; the
    projections are not compiled (wo runs its own forward)."""
    model = tiny_model("llama_gqa")
    graphs = Graphs()
    fast = Compiled(model, graphs)
    with torch.inference_mode(), fast.compiled_mlps():
        for n in (70, 100, 130, 1, 0):
            for block in model.layers:
                x = torch.randn(n, model.cfg.dim)
                torch.testing.assert_close(block.mlp(x), MLP.forward(block.mlp, x), atol=1e-6, rtol=1e-6)
            assert graphs.count == 1
        assert graphs.calls == 3 * len(model.layers)                # 1 and 0 rows: not through the graph
        assert all("forward" not in vars(m) for block in model.layers for m in block.attn.modules())
        model.layers[0].attn.wo(torch.randn(2, 3, model.cfg.n_heads * model.cfg.head_dim))
        assert graphs.count == 1 and graphs.calls == 3 * len(model.layers)


def test_the_models_own_modules_are_back_after_a_call_even_one_that_raises():
    model = routed("llama_gqa", "all")
    fast, idx = Compiled(model, "aot_eager"), tokens(2, 16)
    with torch.inference_mode():
        want, _ = model(idx)
        fast(idx)
        for block in model.layers:
            assert "forward" not in vars(block.mlp)

        def boom(module, args, out):
            assert "forward" in vars(module)                        # the compiled rows ran
            raise RuntimeError("boom")

        hook = model.layers[1].mlp.register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            fast(idx)
        hook.remove()
        for block in model.layers:
            assert "forward" not in vars(block.mlp)
        assert torch.equal(model(idx)[0], want)                     # eager: the model's own forward


def tiny_bench(monkeypatch, capsys, max_seq_len, *argv):
    """bench.py's JSON rows on a tiny random Llama ("tiny-llama"; kv="all", one thread)."""
    monkeypatch.setitem(bench.PRESETS, "tiny-llama", dict(vocab_size=300, dim=32, n_layers=2, n_heads=4,
                                                         n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=max_seq_len))
    bench.main(["--init=tiny-llama", "--random_weights=True", "--kv=all", "--threads=1", "--json", *argv])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def compiled_calls(monkeypatch) -> Counter:
    """Every Compiled's calls from now on, counted here: ("step", routers_off) for each compiled
    decoding step (Compiled.decode), "prefill" for each forward of more than one token."""
    calls, own_decode, own_call = Counter(), Compiled.decode, Compiled.__call__

    def decode(self, idx, cache, routers_off):
        calls["step", bool(routers_off)] += 1
        return own_decode(self, idx, cache, routers_off)

    def call(self, idx, *args, **kwargs):
        calls["prefill"] += idx.shape[1] > 1
        return own_call(self, idx, *args, **kwargs)
    monkeypatch.setattr(Compiled, "decode", decode)
    monkeypatch.setattr(Compiled, "__call__", call)
    return calls


def test_bench_compile_adds_the_eager_against_compiled_rows(monkeypatch, capsys):
    """Both paths of every row run through Compiled: the compiled dense row's, and the random
    gates' dense and sparse decoding (12 steps each, at least) and prefills."""
    calls = compiled_calls(monkeypatch)
    rows = tiny_bench(monkeypatch, capsys, 64, "--densities=0.5", "--prefill=1x16", "--prompt_len=8",
                      "--new_tokens=12", "--repeat=1", "--compile=True")
    assert [(r["mode"], r["gates"]) for r in rows] == [("prefill", "compiled"), ("decode", "compiled"),
                                                       ("prefill", "random"), ("decode", "random")]
    assert calls["step", True] >= 2 * 12 and calls["step", False] >= 12 and calls["prefill"] >= 3, calls
    for r in rows[:2]:
        assert r["density"] == 1.0 and r["dense_s"] > 0 and r["sparse_s"] > 0
    assert 0.1 < rows[3]["density"] < 0.9                         # 48 random gates at 0.5
    with pytest.raises(ValueError, match="use --decode_batch=1"):
        bench.main(["--init=tiny-llama", "--random_weights=True", "--compile=True", "--decode_batch=2"])


def test_sample_compile_prints_the_eager_text(tiny_hf, tmp_path_factory, capsys, monkeypatch):
    """sample.py --compile=True on a sparse checkpoint: the same greedy text and the same share
    of compute per token as without it, every decoding step (sparse, and the dense one it is
    timed against) through the compiled step."""
    import sample
    from conftest import tiny_model_folder
    from test_cli import make_checkpoint
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, "llama", False)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("compiled") / "ckpt", folder, lora_std=0.3)
    argv = [f"--ckpt={ckpt}", "--prompt=the cat", "--temperature=0", "--max_new_tokens=8", "--no_color"]
    calls = compiled_calls(monkeypatch)
    sample.main(argv)
    eager = capsys.readouterr().out.splitlines()[0]
    assert not calls                                                # without --compile: the model itself
    sample.main(argv + ["--compile=True"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == eager
    n = int(re.search(r"^--- (\d+) tokens: sparse", out, re.M).group(1))
    assert n >= 2 and calls["prefill"] >= 2, out                    # the sparse tokens and the dense timing,
    assert calls["step", False] >= n - 1 and calls["step", True] >= n - 1, calls    # every step compiled


def test_evaluate_compile_gives_the_eager_numbers(tiny_hf, tmp_path_factory, monkeypatch, capsys):
    """evaluate.py --compile=True on a sparse checkpoint and on its base model: the perplexities,
    KL and densities of the eager run, through compiled graphs; refused with the masked path."""
    from conftest import tiny_model_folder, word_text_file
    from test_cli import SEQ_LEN, make_checkpoint
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, "llama", False)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("compiled") / "ckpt", folder, lora_std=0.3)
    text = word_text_file(tmp_path_factory, "val", 400, seed=0)
    graphs = Graphs()
    monkeypatch.setattr(evaluate, "Compiled", lambda model: compiled.Compiled(model, graphs))   # not inductor: fast

    def run(*argv):
        evaluate.main([*argv, f"--text={text}", f"--seq_len={SEQ_LEN}", "--json"])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    against_dense = ("perplexity", "dense_perplexity", "kl_to_dense", "top1_agreement", "density", "compute_ratio")
    for argv, keys in (([f"--ckpt={ckpt}"], against_dense), ([f"--ckpt={ckpt}", "--gates=random"], against_dense),
                       ([f"--init={folder}"], ("perplexity",))):
        eager, before = run(*argv), graphs.calls
        fast = run(*argv, "--compile=True")
        assert graphs.calls > before                                     # it did run compiled graphs
        for key in keys:
            assert fast[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-7), (argv, key)
        if "density" in keys:
            assert 0.2 < fast["density"] < 0.8 and fast["kl_to_dense"] > 1e-3   # the gates skip, LoRA moves
    with pytest.raises(ValueError, match="drop --path=masked"):
        evaluate.main([f"--ckpt={ckpt}", f"--text={text}", "--compile=True", "--path=masked"])
    with pytest.raises(ValueError, match="--gates=peek .* drop --compile"):
        evaluate.main([f"--ckpt={ckpt}", f"--text={text}", "--compile=True", "--gates=peek"])


# ----------------------------------------------------------------------------------------------
# tools/gpu_bench.sh: the GPU rows, prepared on a machine without one
# ----------------------------------------------------------------------------------------------

GPU_BENCH = Path(__file__).resolve().parents[1] / "tools" / "gpu_bench.sh"


def test_gpu_bench_script_runs_commands_that_bench_accepts(monkeypatch):
    """Every bench line of the script is a valid bench.py command for its preset (flags, shapes,
    the context), and every research module it runs accepts its flags, so a GPU session spends
    its minutes measuring, not on a typo."""
    text = GPU_BENCH.read_text().replace("\\\n", " ")                   # continued lines joined
    common = shlex.split(text.split('COMMON="', 1)[1].split('"', 1)[0])
    lines = [shlex.split(line)[3:] for line in text.splitlines() if line.startswith(("bench ", "named "))]
    assert len(lines) == 7
    for args in lines:
        config = dict(bench.DEFAULTS, **bench.overrides(bench.DEFAULTS, common + args))
        bench.check(config)
        assert config["random_weights"] and config["device"] == "cuda" and config["init"] in PRESETS
        bench.check_context(SimpleNamespace(cfg=ModelConfig(**PRESETS[config["init"]])), config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)         # their checks ask for a GPU
    runs = [shlex.split(line)[4:] for line in text.splitlines() if line.startswith("run ")]  # after "python"
    assert [r[:2] for r in runs] == [["-m", "research.launch_profile"]] * 2 + [["-m", "research.attn_kernels"]]
    for args in runs:
        module = importlib.import_module(args[1])
        config = dict(module.DEFAULTS, **module.overrides(module.DEFAULTS, args[2:]))
        module.check(config)
        assert config["device"] == "cuda" and config["preset"] == "llama-3.1-8b"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would measure it")
def test_gpu_bench_script_stops_with_a_clear_message_without_a_gpu(tmp_path):
    run = subprocess.run(["bash", str(GPU_BENCH), str(tmp_path / "gpu")], capture_output=True, text=True,
                         cwd=GPU_BENCH.parents[1])
    assert run.returncode == 2 and "no CUDA device" in run.stderr
    assert not list((tmp_path / "gpu").glob("*.json"))
