"""research/substitute_fit.py: its fits on data made to fit them, and a run on a tiny model folder.

    python -m pytest tests/test_substitute_fit.py -q
"""
import contextlib
import io
import json

import pytest
import torch

import test_train
from research import substitute_fit

folder, corpus = test_train.folder, test_train.corpus     # module-scoped fixtures: a tiny llama, its texts


def sums(x, y, p) -> dict:
    """The sums substitute_fit.moments keeps, of rows x, y and y_prev (N, d)."""
    return dict(n=len(x), x=x.sum(0), y=y.sum(0), p=p.sum(0), xx=x.T @ x, xy=x.T @ y, xp=x.T @ p,
                pp=(p * p).sum(0), py=(p * y).sum(0))


def r2(f, x, y, p) -> float:
    return (1 - ((y - f(x, p)) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()).item()


def test_each_substitute_is_exact_where_the_output_is_of_its_form():
    torch.manual_seed(0)
    N, d = 4000, 12
    x, p = torch.randn(N, d, dtype=torch.float64), torch.randn(N, d, dtype=torch.float64)
    low = torch.randn(d, 2, dtype=torch.float64) @ torch.randn(2, d, dtype=torch.float64) / d ** 0.5   # rank 2
    scale, shift = torch.linspace(1, 2, d, dtype=torch.float64), torch.arange(d, dtype=torch.float64)
    cases = {"rank 2": x @ low + shift,                           # a rank-2 map of x
             "previous": p * scale + shift,                       # the previous output, scaled per dimension
             "previous + rank 2": p * scale + x @ low + shift}    # both
    for exact, y in cases.items():
        found = {name: r2(f, x, y, p) for name, f in substitute_fit.fit(sums(x, y, p), (2,), ridge=0.0).items()}
        assert found[exact] == pytest.approx(1.0, abs=1e-9), (exact, found)
        assert found["mean"] == pytest.approx(0.0, abs=1e-9)      # in sample, about the same mean
        if exact != "previous + rank 2":                          # the wider form holds the narrower one
            assert found["previous + rank 2"] == pytest.approx(1.0, abs=1e-6)
            other = "previous" if exact == "rank 2" else "rank 2"
            assert found[other] < 0.9, (exact, found)             # each misses what the other is
        else:
            assert max(found["rank 2"], found["previous"]) < 0.9, found


def test_the_rows_leave_out_position_0_and_pair_each_token_with_the_one_before():
    h, x, y = (torch.randn(2, 5, 3) for _ in range(3))                  # (B, T, d) as sublayer_io gives them
    rx, ry, rp = substitute_fit.rows((h, x, y))
    assert rx.shape == ry.shape == rp.shape == (2 * 4, 3)
    for b in range(2):
        for t in range(1, 5):                                             # row b * 4 + t - 1 is token t of window b
            i = b * 4 + t - 1
            assert torch.equal(rx[i], x[b, t].double()) and torch.equal(ry[i], y[b, t].double())
            assert torch.equal(rp[i], y[b, t - 1].double())              # its previous: position 0 for t = 1


def test_a_run_reports_every_sublayer_on_both_texts(folder, corpus):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        substitute_fit.main([f"--init={folder}", f"--data={corpus / 'train'}", f"--text={corpus / 'val' / 'c.txt'}",
                             "--fit_windows=4", "--windows=2", "--seq_len=32", "--ranks=2,8", "--json"])
    text = buf.getvalue()
    out = json.loads(text.strip().splitlines()[-1])
    names = ["mean", "rank 2", "rank 8", "previous", "previous + rank 2"]
    assert set(out["fit"]) == set(out["text"]) == {"0 attn", "0 mlp", "1 attn", "1 mlp"}
    for sublayer, found in out["fit"].items():
        assert list(found) == names
        assert found["mean"] == pytest.approx(0.0, abs=1e-9)     # in sample, about the same mean
        assert found["rank 2"] <= found["rank 8"] + 1e-9 <= 1 + 1e-9
        assert found["previous + rank 2"] >= found["previous"] - 1e-9
    assert all(v <= 1 for found in out["text"].values() for v in found.values())
    assert (out["fit_windows"], out["windows"]) == (4, 2)
    assert "median mlp" in " ".join(text.split())                # the table's per-kind medians


@pytest.mark.parametrize("flags, message", [
    ([], "needs --text=FILE"),
    (["--text=x.txt", "--ranks=0"], "--ranks"),
    (["--text=x.txt", "--fit_windows=0"], "--fit_windows"),
])
def test_bad_flags_are_named(flags, message):
    with pytest.raises(ValueError, match=message):
        substitute_fit.main(flags)


def test_a_rank_wider_than_the_model_is_named(folder, corpus):
    with pytest.raises(ValueError, match="exceeds the model's width 64"):
        substitute_fit.main([f"--init={folder}", f"--text={corpus / 'val' / 'c.txt'}", "--ranks=65"])
