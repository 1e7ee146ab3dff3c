"""research/launch_profile.py on the CPU (tiny shapes, random weights): the rows, and what the counts
show there already: a compacted prefill dispatches more ops than the dense one (the gathers, packing
and scatters of every sublayer), and a decoding step that skips dispatches fewer. Kernels and the
device's busy share are a GPU's (results/gpu/launch-profile*.json); on a CPU they are 0 and None.

    python -m pytest tests/test_launch_profile.py -q
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import launch_profile  # noqa: E402

TINY = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=512)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(launch_profile.PRESETS, "tiny-gqa", TINY)


def test_rows_and_what_the_counts_show(tiny, capsys):
    rows = launch_profile.main(["--preset=tiny-gqa", "--seq_len=200", "--steps=6", "--densities=1,0.5",
                                "--json"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == rows
    got = {(r["mode"], r["density"]): r for r in rows}
    assert sorted(got) == [("decode", 0.5), ("decode", 1.0), ("prefill", 0.5), ("prefill", 1.0)]
    for r in rows:
        assert r["wall_ms"] > 0 and r["profiled_ms"] > 0 and r["ops"] > 0
        assert r["kernels"] == 0 and r["kernel_ms"] == 0 and r["busy"] is None
    assert got["prefill", 0.5]["ops"] > 1.5 * got["prefill", 1.0]["ops"]
    assert got["decode", 0.5]["ops"] < got["decode", 1.0]["ops"]


def test_top_ops_and_the_fixed_capacity_prefill(tiny):
    rows = launch_profile.main(["--preset=tiny-gqa", "--seq_len=200", "--steps=2", "--densities=1,0.5",
                                "--top=5", "--capacity=True", "--repeat=2"])
    for r in rows:
        assert 0 < len(r["top"]) <= 5 and r["capacity"] == (r["mode"] == "prefill")
        ms = [t[2] for t in r["top"]]
        assert ms == sorted(ms, reverse=True) and all(t[0].startswith("aten::") and t[1] > 0 for t in r["top"])
    names = [t[0] for t in launch_profile.main(["--preset=tiny-gqa", "--seq_len=200", "--steps=2",
                                                "--densities=0.5", "--top=100", "--capacity=True"])[0]["top"]]
    assert "aten::sort" in names and "aten::nonzero" not in names      # fixed capacities: no count read back


def test_bad_flags(tiny):
    for argv, message in ((["--preset=gpt-5"], "not one of model.PRESETS"),
                          (["--dtype=int8"], "--dtype must be float32"),
                          (["--densities=1.5"], "densities"),
                          (["--preset=tiny-gqa", "--seq_len=510", "--steps=8"], "exceeds the context of 512")):
        with pytest.raises(ValueError, match=message):
            launch_profile.main(argv)
