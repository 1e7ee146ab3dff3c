"""--compile: the compiled decoding step (compiled.py) gives the eager step's tokens, logits and gates.

    python -m pytest tests/test_compiled.py -q

The routers are real ones with random weights, so the gates depend on the hidden state and
both branches of every torch.cond run. Most checks trace the step with backend="aot_eager"
(the graph torch.compile captures, without generating code: seconds); three run inductor's
generated code (C++, minutes in all): one model sparse and dense, sample.py --compile and
bench.py --compile on tiny models.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench
import router
from compiled import Compiled
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


def test_routers_off_is_the_dense_model():
    assert_same_decoding(routed("gemma2", "all"), "aot_eager", routers_off=True)


def test_inductors_code_decodes_as_the_eager_step():
    model = routed("gemma2", "kept", substitute=4)          # soft-capping, a window, kv="kept", substitutes
    assert_same_decoding(model, "inductor")
    assert_same_decoding(model, "inductor", routers_off=True)


def test_anything_but_a_one_token_step_of_batch_1_runs_the_model():
    model = routed("llama_gqa", "all")
    fast = Compiled(model, backend=lambda *a: pytest.fail("compiled a call that is not a decoding step"))
    with torch.inference_mode():
        want, _ = model(tokens(2, 6))
        got, _ = fast(tokens(2, 6))                                # no cache, batch 2
        cache = model.new_cache(2, 8)
        fast(tokens(2, 6), cache=cache)                             # a prefill
        fast(tokens(2, 1), cache=cache)                             # a step of batch 2
    assert torch.equal(got, want)


def test_a_cache_with_deferred_kv_is_refused():
    model = routed("llama_gqa", "all")
    cache = model.new_cache(1, 20)
    with torch.inference_mode():
        model(tokens(1, 5), cache=cache)
        for _ in range(6):                                          # eager steps: some skip and defer
            model(tokens(1, 1, seed=len(cache.layers[0].deferred)), cache=cache)
        if not any(c.deferred for c in cache.layers):
            pytest.skip("no eager step deferred its K/V")
        with pytest.raises(ValueError, match="deferred K/V"):
            Compiled(model, "aot_eager")(tokens(1, 1), cache=cache)


def test_bench_compile_adds_the_eager_against_compiled_row(monkeypatch, capsys):
    monkeypatch.setitem(bench.PRESETS, "tiny-llama", dict(vocab_size=300, dim=32, n_layers=2, n_heads=4,
                                                         n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=64))
    bench.main(["--init=tiny-llama", "--random_weights=True", "--densities=0.5", "--kv=all", "--prefill=1x16",
                "--prompt_len=8", "--new_tokens=12", "--repeat=1", "--threads=1", "--compile=True", "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["mode"], r["gates"]) for r in rows] == [("decode", "compiled"), ("prefill", "random"),
                                                       ("decode", "random")]
    assert rows[0]["density"] == 1.0 and rows[0]["dense_s"] > 0 and rows[0]["sparse_s"] > 0
    assert 0.1 < rows[2]["density"] < 0.9                         # 48 random gates at 0.5
    with pytest.raises(ValueError, match="use --decode_batch=1"):
        bench.main(["--init=tiny-llama", "--random_weights=True", "--compile=True", "--decode_batch=2"])


def test_sample_compile_prints_the_eager_text(tiny_hf, tmp_path_factory, capsys):
    """sample.py --compile=True on a sparse checkpoint: the same greedy text and the same share
    of compute per token as without it."""
    import sample
    from conftest import tiny_model_folder
    from test_cli import make_checkpoint
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, "llama", False)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("compiled") / "ckpt", folder, lora_std=0.3)
    argv = [f"--ckpt={ckpt}", "--prompt=the cat", "--temperature=0", "--max_new_tokens=8", "--no_color"]
    sample.main(argv)
    eager = capsys.readouterr().out.splitlines()[0]
    sample.main(argv + ["--compile=True"])
    assert capsys.readouterr().out.splitlines()[0] == eager
