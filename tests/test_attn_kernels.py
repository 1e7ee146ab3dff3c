"""research/attn_kernels.py: every kernel gives the reference's output for the kept queries of a
compacted prefill, and the rows' arithmetic. Tiny head shapes; FlexAttention runs uncompiled here
(torch.compile made the identity), which computes the same thing slowly.

    python -m pytest tests/test_attn_kernels.py -q
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import attn_kernels  # noqa: E402

TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=512)
GEMMA2 = dict(TINY, query_scale=8.0, attn_softcap=2.0, sliding_window=4, layer_types=("sliding", "full"))


@pytest.fixture
def presets(monkeypatch):
    monkeypatch.setitem(attn_kernels.PRESETS, "tiny-gqa", TINY)
    monkeypatch.setitem(attn_kernels.PRESETS, "tiny-gemma2", GEMMA2)
    monkeypatch.setattr(torch, "compile", lambda f, **kwargs: f)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("preset", ["tiny-gqa", "tiny-gemma2"])
def test_every_kernel_gives_the_reference_output(presets, preset, capsys):
    attn_kernels.main([f"--preset={preset}", "--seq_len=300", "--density=0.4", "--repeat=1", "--json"])
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    rows = {r["kernel"]: r for r in out["rows"]}
    assert list(rows) == list(attn_kernels.KERNELS) and "efficiency" in text
    assert (out["heads"], out["kv_heads"], out["head_dim"]) == (4, 2, 8)
    # the kept positions (--seed's draw, position 0 always kept) and their share of the visible
    # (query, key) pairs: the query at position p sees the p + 1 keys 0..p, of 300 * 301 / 2 in all
    keep = torch.rand(300, generator=torch.Generator().manual_seed(attn_kernels.DEFAULTS["seed"])) < 0.4
    keep[0] = True
    assert out["kept"] == int(keep.sum()) and 60 < out["kept"] < 180
    assert out["visible_share"] == pytest.approx(float((keep.nonzero()[:, 0] + 1).sum()) / (300 * 301 / 2))
    for name, r in rows.items():
        assert r["ms"] > 0
        if name == "dense":
            assert r["x_dense"] == 1.0 and r["efficiency"] is None and r["max_diff"] is None
        elif name != "sdpa_gqa":                  # the reference itself: checked on its own below
            assert r["max_diff"] < 1e-5, name
            assert r["efficiency"] == pytest.approx(out["visible_share"] / r["x_dense"])


@pytest.mark.parametrize("preset", [TINY, GEMMA2])
def test_the_reference_kernel_is_attention_written_out(preset):
    """sdpa_gqa, the kernel every other row is compared with, against softmax(q k^T) v written out
    here (scores soft-capped where the model caps them), for kept queries at their positions."""
    cfg = attn_kernels.ModelConfig(**preset)
    with torch.device("meta"):
        a = attn_kernels.Attention(cfg, attn_kernels.full_layer(cfg))
    g = torch.Generator().manual_seed(0)
    T = 40
    q_pos = torch.randperm(T, generator=g)[:15].sort().values[None]          # (1, Tq) kept positions
    q, dense_q = torch.randn(1, 4, 15, 8, generator=g), torch.randn(1, 4, T, 8, generator=g)
    k, v = torch.randn(1, 2, T, 8, generator=g), torch.randn(1, 2, T, 8, generator=g)
    runs = attn_kernels.candidates(a, q, k, v, q_pos, dense_q, {"sdpa_gqa", "sdpa_repeat", "blocks"})
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * a.scale        # (1, H, Tq, T)
    if cfg.attn_softcap:
        scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
    scores = scores.masked_fill(torch.arange(T)[None, None, None] > q_pos[:, None, :, None], float("-inf"))
    want = (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2).flatten(2)     # (1, Tq, H*D)
    for name, run in runs.items():
        torch.testing.assert_close(run(), want, atol=1e-5, rtol=1e-5, msg=name)


def test_the_sliding_layers_are_passed_over(presets):
    cfg = attn_kernels.ModelConfig(**GEMMA2)
    assert attn_kernels.full_layer(cfg) == 1


def test_bad_flags(presets):
    for argv, message in ((["--kernels=blocks,fast"], "unknown fast; choose from blocks"),
                          (["--preset=gpt-5"], "not one of model.PRESETS"),
                          (["--dtype=int8"], "--dtype must be float32"),
                          (["--density=1.5"], "density")):
        with pytest.raises(ValueError, match=message):
            attn_kernels.main(argv)
