"""research/router_fit.py: its scores and fits on data made for them, and a run on a tiny model folder.

    python -m pytest tests/test_router_fit.py -q
"""
import contextlib
import io
import json

import pytest
import torch

import test_train
from research import router_fit

folder, corpus = test_train.folder, test_train.corpus     # module-scoped fixtures: a tiny llama, its texts


def test_regret_is_0_for_the_oracle_and_near_1_for_a_blind_guess():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4000, generator=g, dtype=torch.float64)
    loss = t.exp()                                             # what a skip loses grows with t
    assert router_fit.scores(t, t, loss, 0.25) == dict(r2=1.0, regret=0.0)
    blind = router_fit.scores(t, torch.randn(4000, generator=g, dtype=torch.float64), loss, 0.25)
    assert 0.9 < blind["regret"] < 1.1 and blind["r2"] < 0
    assert router_fit.scores(t, -t, loss, 0.25)["regret"] > 1    # the worst choice: worse than random


def test_both_predictors_learn_a_linear_target():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 16, generator=g)
    t = x @ torch.randn(16, generator=g) + 0.5
    linear = router_fit.fit_linear(x, t, ridge=0.0)
    mlp = router_fit.fit_mlp(x, t, hidden=32, steps=400, seed=0)
    assert router_fit.scores(t, linear(x), t.exp(), 0.25)["r2"] == pytest.approx(1.0, abs=1e-6)
    assert router_fit.scores(t, mlp(x), t.exp(), 0.25)["r2"] > 0.95


def test_rows_join_the_windows_and_leave_out_position_0(monkeypatch):
    """rows: each key's (h, x, y) over every window in order, position 0 (a sink) left out, float32."""
    made = {}

    def io(model, idx, keys):                                       # sublayer_io's (1, T, d) tensors
        made[int(idx[0, 0])] = {key: tuple(torch.randn(1, 5, 3, dtype=torch.float64) for _ in range(3))
                                for key in keys}
        return made[int(idx[0, 0])]
    monkeypatch.setattr(router_fit, "sublayer_io", io)
    keys = [(0, "attn"), (1, "mlp")]
    found = router_fit.rows(None, [torch.tensor([7, 1, 2, 3, 4]), torch.tensor([9, 1, 2, 3, 4])], keys)
    assert sorted(found) == keys
    for key in keys:
        for i, t in enumerate(found[key]):                          # h, x, y
            assert t.dtype == torch.float32 and t.shape == (2 * 4, 3)
            want = torch.cat([made[7][key][i][0, 1:], made[9][key][i][0, 1:]]).float()
            assert torch.equal(t, want), (key, i)


def test_a_run_reports_every_sublayer_on_both_texts(folder, corpus):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        router_fit.main([f"--init={folder}", f"--data={corpus / 'train'}", f"--text={corpus / 'val' / 'c.txt'}",
                         "--fit_windows=4", "--windows=2", "--seq_len=32", "--rank=2", "--steps=20", "--json"])
    text = buf.getvalue()
    out = json.loads(text.strip().splitlines()[-1])
    assert set(out["fit"]) == set(out["text"]) == {"0 attn", "0 mlp", "1 attn", "1 mlp"}
    for part in ("fit", "text"):
        for found in out[part].values():
            assert list(found) == list(router_fit.PREDICTORS)
            assert all(s["r2"] <= 1 + 1e-9 and s["regret"] == s["regret"] for s in found.values())   # not NaN
    assert all(found["linear"]["r2"] > 0 for found in out["fit"].values())    # in sample, it fits something
    assert "attn  linear" in text and "mlp   mlp" in text


@pytest.mark.parametrize("flags, message", [
    ([], "needs --text=FILE"),
    (["--text=x.txt", "--skip=1.5"], "--skip"),
    (["--text=x.txt", "--hidden=0"], "--hidden"),
])
def test_bad_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        router_fit.main(flags)
