"""tests/test_eval_suite.py — eval.py's --gates=peek for --tasks: the threshold set on --text for
--target_compute, multiple choice on the masked path, generation without a KV cache.

Tiny model folders (conftest.py) with a fabricated checkpoint (test_cli.make_checkpoint: random
routers, about half the gates closed).
"""
import json

import pytest

import eval as eval_cli
import load_weights
import lora
import router
from conftest import tiny_model_folder, word_text_file
from test_cli import FAMILIES, make_checkpoint

SEQ_LEN = 16


# ----------------------------------------------------------------------------------------------
# On a tiny checkpoint
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("llama", False), ("gemma3_text", True)], ids=["llama", "gemma3"])
def ckpt(request, tiny_hf, tmp_path_factory):
    """(checkpoint, its base folder, adds BOS): routers about half closed, LoRA B nonzero."""
    family, bos = request.param
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, family, bos, **FAMILIES[family])
    return make_checkpoint(tmp_path_factory.mktemp(f"{family}_suite") / "ckpt", folder, lora_std=0.3), folder, bos


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return word_text_file(tmp_path_factory, "suite", 400, seed=1)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A multiple-choice task with exact-match targets, in the tiny vocabulary."""
    path = tmp_path_factory.mktemp("task") / "tiny.json"
    examples = [{"input": "the cat sat on the", "target_scores": {"mat": 1, "log": 0}, "target": "mat"},
                {"input": "a dog ran under the", "target_scores": {"log": 1, "red dog": 0}, "target": "log"},
                {"input": "it was", "target_scores": {"big": 1, "blue": 0}, "target": "big"}]
    path.write_text(json.dumps({"examples": examples, "example_input_prefix": "", "example_output_prefix": " ",
                                "preferred_score": "exact_str_match", "output_regex": "[a-z]+"}))
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# --gates=peek for --tasks
# ----------------------------------------------------------------------------------------------

def test_peek_gates_for_tasks_land_on_their_target_compute(ckpt, text_file, task_file, capsys):
    """The threshold is chosen on --text for --target_compute; multiple choice and generation then
    run on the masked path with the base weights (LoRA off) and the routers are restored after."""
    ck, _, _ = ckpt
    model, tok, _ = load_weights.load_sparse(ck)
    chunks = eval_cli.windows(tok, text_file.read_text(), SEQ_LEN)
    with eval_cli.gates_as(model, chunks, SEQ_LEN, "peek", target_compute=0.8) as path:
        assert path == "masked" and not any(m.enabled for m in lora.adapters(model))
        assert all(r.mode == "peek" for _, _, r in router.routers(model))
        stats = eval_cli.gate_stats(model, chunks, path="masked")
        assert eval_cli.compute_ratio(model.cfg, SEQ_LEN, stats.density()) == pytest.approx(0.8, abs=0.005)
        row = eval_cli.benchmark(model, tok, eval_cli.read_task(task_file), variants=("dense", "sparse"),
                                 max_new_tokens=3, path=path)
    assert all(r.mode == "learned" for _, _, r in router.routers(model))          # restored after
    assert all(m.enabled for m in lora.adapters(model))
    assert 0 < row["density_sparse"] < 1 and 0 < row["compute_ratio_sparse"] < 1
    assert {"acc_sparse", "acc_norm_sparse", "exact_match_sparse"} <= set(row)
    eval_cli.main([f"--ckpt={ck}", f"--tasks={task_file}", "--gates=peek", f"--text={text_file}",
                   f"--seq_len={SEQ_LEN}", "--target_compute=0.8", "--max_new_tokens=3", "--json"])
    out = last_json(capsys)
    assert out["gates"] == "peek" and out["tasks"] == [row]             # the command gives the same row
    with pytest.raises(ValueError, match="--gates=peek needs --text"):
        eval_cli.main([f"--ckpt={ck}", f"--tasks={task_file}", "--gates=peek"])


def test_masked_generation_without_cache_equals_cached_decoding(ckpt):
    """The uncached masked decoding that peek gates need gives the tokens of cached decoding when
    both run the same gates (here all open)."""
    ck, _, _ = ckpt
    model, tok, _ = load_weights.load_sparse(ck)
    prompts = [tok.encode("the cat sat on the"), tok.encode("a dog ran"), tok.encode("it was big")]
    with router.forced(model, "open"):
        cached = eval_cli.generate_until(model, tok, prompts, ("\n",), max_new_tokens=6)
        masked = eval_cli.generate_until(model, tok, prompts, ("\n",), max_new_tokens=6, path="masked")
    assert masked == cached and all(cached)
