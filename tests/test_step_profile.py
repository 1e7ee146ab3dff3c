"""research/step_profile.py on a tiny random model folder: what it reports, and its errors.

    python -m pytest tests/test_step_profile.py -q

What is checked (never how fast anything is):
- the step is train.py's: its KL is distill.distill_losses' on the same weights and batch, the
  gates keep about --density, and the optimizer moves LoRA (B starts at 0);
- the JSON: the five phases, whose shares sum to a little under 1 (they nest in the step and do
  not overlap; the rest is Python between them); the op classes, non-negative, split the phases'
  time; tokens/s = batch * seq_len / step; the matmul floor = 2 forward + backward, with the
  FLOPs counted by hand from the model's shapes;
- op classes by name; every numeric flag has a Range; bad flags are errors naming the fix.
"""
import contextlib
import io
import json
import statistics

import pytest

import lora
from distill import distill_losses
import test_train
from research import step_profile

folder = test_train.folder            # the tiny llama model folder (a module-scoped fixture)

FLAGS = ["--json", "--steps=1", "--seq_len=16", "--batch_size=2", "--dtype=float32", "--repeat=1"]


@pytest.fixture(scope="module")
def result(folder):
    """The JSON object on the last line of one run, and everything printed."""
    buf = io.StringIO()                                        # capsys is per test: capture by hand
    with contextlib.redirect_stdout(buf):
        step_profile.main([f"--init={folder}"] + FLAGS)
    text = buf.getvalue()
    return json.loads(text.strip().splitlines()[-1]), text


def test_the_step_is_train_steps(folder):
    config = dict(step_profile.DEFAULTS, init=str(folder), seq_len=16, dtype="float32")
    step = step_profile.build(config)
    kl_ref = distill_losses(step.model, step.x, 0.0)[0].item()
    B_before = [m.B.detach().clone() for m in lora.adapters(step.model)]
    step()
    assert kl_ref > 0                                          # some gates closed: the student differs
    assert step.kl == pytest.approx(kl_ref, rel=1e-5)
    assert abs(step.density - config["density"]) < 0.1
    assert all(b.abs().sum() == 0 for b in B_before)
    assert any(m.B.abs().sum() > 0 for m in lora.adapters(step.model))


def test_json_phases_ops_and_floor(result):
    out, text = result
    assert list(out["phases"]) == list(step_profile.PHASES)
    assert all(r["s"] > 0 for r in out["phases"].values())
    phase_share = sum(r["share"] for r in out["phases"].values())
    assert 0 < phase_share <= 1.05                             # spans inside the step (under 1: the lines between)
    assert {"matmul", "attention", "copies/casts", "other ops", "outside ops"} <= set(out["ops"])
    assert all(r["s"] >= 0 and r["share"] >= 0 for r in out["ops"].values())
    assert out["ops"]["matmul"]["s"] > 0 and out["ops"]["attention"]["s"] > 0
    # self times partition the phases' spans (every op runs inside one phase)
    assert sum(r["share"] for r in out["ops"].values()) == pytest.approx(phase_share, rel=0.01)
    assert out["step_s"] == statistics.median(out["step_s_all"]) and len(out["step_s_all"]) == 1
    assert out["tokens_per_s"] == pytest.approx(2 * 16 / out["step_s"], rel=1e-12)
    assert out["matmul_floor_s"] == pytest.approx(2 * out["matmul_forward_s"] + out["matmul_backward_s"])
    assert out["matmul_floor_s"] > 0
    assert out["step_over_floor"] == pytest.approx(out["step_s"] / out["matmul_floor_s"])
    assert out["matmul_gflops"] == pytest.approx(out["matmul_gflop"] / out["matmul_floor_s"])
    assert "matmul floor:" in text and "teacher forward" in text


def test_floor_flops_counted_from_the_shapes(result, folder):
    cfg = json.loads((folder / "config.json").read_text())
    d, f, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = d // cfg["num_attention_heads"]
    per_layer = 2 * d * cfg["num_attention_heads"] * hd + 2 * d * cfg["num_key_value_heads"] * hd + 3 * d * f
    rows = 2 * 16                                              # llama: no BOS added
    assert result[0]["matmul_gflop"] == pytest.approx(3 * 2 * rows * (L * per_layer + V * d) / 1e9)


@pytest.mark.parametrize("name, cls", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::linear", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::scaled_dot_product_attention", "attention"), ("aten::_to_copy", "copies/casts"),
    ("aten::copy_", "copies/casts"), ("aten::mul", "aten::mul"), ("teacher forward", "outside ops"),
    ("autograd::engine::evaluate_function: MmBackward0", "outside ops"),
])
def test_op_class(name, cls):
    assert step_profile.op_class(name) == cls


@pytest.mark.parametrize("argv, message", [
    (["--steps=0"], "--steps=0 is out of range: it must be >= 1"),
    (["--density=1.5"], "--density=1.5 is out of range: it must be in [0, 1]"),
    (["--seq_len=1"], "--seq_len=1 is out of range: it must be >= 2"),
    (["--stpes=2"], "unknown option --stpes"),
    (["--seq_len=100"], "--seq_len=100 is over the model's context of 64: lower --seq_len"),
])
def test_bad_flags_are_errors_naming_the_fix(argv, message, folder):
    with pytest.raises(ValueError) as info:
        step_profile.main([f"--init={folder}", "--dtype=float32"] + argv)
    assert message in str(info.value)
