"""research/decode_profile.py on a tiny random model folder: what it reports, and its errors.

    python -m pytest tests/test_decode_profile.py -q

What is checked (never how fast anything is): one row per density, with the density the forced
gates kept and bench.py's speedup arithmetic; the profile's classes, non-negative, with the matmuls
and attention of a decoding step found and nothing compiled on the eager path; the class of a
profiler event by its name, for eager and compiled code; bad flags are errors naming the fix.
The compiled path runs the same function on compiled.Compiled, which tests/test_compiled.py checks.
"""
import contextlib
import io
import json

import pytest

import test_train
from research import decode_profile

folder = test_train.folder            # the tiny llama model folder (a module-scoped fixture)


@pytest.fixture(scope="module")
def rows(folder):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        decode_profile.main([f"--init={folder}", "--paths=eager", "--densities=1,0.5", "--prompt_len=8",
                             "--steps=6", "--repeat=1", "--json"])
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_a_row_per_density_with_benchs_arithmetic(rows):
    assert [r["path"] for r in rows] == ["eager", "eager"]
    assert rows[0]["density"] == 1.0
    assert 0.2 < rows[1]["density"] < 0.8                     # random gates at 0.5, over few tokens
    for r in rows:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert 0.98 < rows[0]["ideal_speedup"] <= 1.0               # the routers cost a little
    assert rows[1]["ideal_speedup"] > 1.2


def test_profiled_classes(rows):
    for r in rows:
        for path in ("profiled_dense", "profiled_sparse"):
            p = r[path]
            assert list(p) == list(decode_profile.CLASSES)
            assert all(v >= 0 for v in p.values())
            assert p["matmul"] > 0 and p["attention"] > 0 and p["other ops"] > 0
            assert p["compiled kernels"] == p["compiled-call overhead"] == 0     # eager: nothing compiled


@pytest.mark.parametrize("name, kind", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::linear", "matmul"), ("aten::addmv", "matmul"),
    ("aoti_torch_cpu_mm_out", "matmul"), ("aoti_torch_cuda_addmm_out", "matmul"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::add", "other ops"), ("aten::rsqrt", "other ops"), ("aoti_torch_cpu_index_copy", "other ops"),
    ("## Call CompiledFxGraph f7zq ##", "compiled kernels"),
    ("TorchDynamo Cache Lookup", "compiled-call overhead"), ("Pregraph bytecode", "compiled-call overhead"),
    ("AOTDispatcher Runtime Wrapper Prologue", "compiled-call overhead"),
    ("Torch-Compiled Region: 0/1", "compiled-call overhead"),
    ("graph_0_cpp_fused_add_mean_0", "compiled kernels"),
    ("ProfilerStep#1", None), ("cudaLaunchKernel", None),
])
def test_op_class(name, kind):
    assert decode_profile.op_class(name) == kind


@pytest.mark.parametrize("flag, words", [
    ("--densities=1.5", "densities"), ("--steps=0", "steps"), ("--repeat=0", "repeat"), ("--nope=1", "nope"),
    ("--paths=eager,jit", "jit"),
])
def test_bad_flags(flag, words):
    with pytest.raises(ValueError, match=words):
        decode_profile.main([flag])


def test_a_context_too_long_is_an_error(folder):
    with pytest.raises(ValueError, match="prompt_len.*context"):
        decode_profile.main([f"--init={folder}", "--paths=eager", "--prompt_len=100000"])
