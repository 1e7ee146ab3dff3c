"""tests/test_vs_hf.py — research/vs_hf.py on a tiny LLaMA folder (conftest.py): our model, eager or
compiled, against transformers on the same weights; the rows, and the same greedy tokens."""
import json

import pytest

from compiled import Compiled
from conftest import tiny_model_folder, word_text_file
from research import vs_hf


@pytest.mark.parametrize("compile", [False, True])
def test_ours_against_transformers_gives_both_rows_and_the_same_tokens(compile, tiny_hf, tmp_path_factory,
                                                                        monkeypatch, capsys):
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, "llama", adds_bos=False)
    text = word_text_file(tmp_path_factory, "vs_hf", 200, seed=3)
    # the traced graph without inductor's code generation: what --compile runs, in seconds
    monkeypatch.setattr(vs_hf, "Compiled", lambda model: Compiled(model, backend="aot_eager"))
    vs_hf.main([f"--init={folder}", f"--text={text}", "--repeat=1", "--hf_seq_len=16", "--hf_prompt_len=8",
                "--hf_new_tokens=6", f"--compile={compile}", "--json"])
    out = capsys.readouterr().out
    rows = json.loads(out.splitlines()[-1])
    assert [r["mode"] for r in rows] == ["prefill", "decode"]
    assert {r["ours"] for r in rows} == {"compiled" if compile else "eager"}
    assert all(r["ours_s"] > 0 and r["hf_s"] > 0 and r["speedup"] == r["hf_s"] / r["ours_s"] for r in rows)
    assert rows[1]["same_tokens"] is True, out
    assert ("ours compiled" in out.splitlines()[0]) == compile
