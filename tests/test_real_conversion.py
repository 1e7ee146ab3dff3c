"""Conversion on SmolLM2-135M-Instruct: export round trip (float32) and a bfloat16 run.

    python -m pytest -m real -s tests/test_real_conversion.py

The model is found by name (conftest.real_checkpoint); it is stored in bfloat16 and runs in
float32 here, and export writes float32. Export: train 2 steps, export; the folder, loaded with
no base model beside it, must give evaluate.py's perplexity of the checkpoint to 1e-4 relative
(same windows, same gates) and sample.py's greedy tokens. bfloat16: train 2 steps of the bf16
checkpoint with --dtype=bfloat16; the losses are finite (and nonzero: the fitted gates start
partly closed) and the checkpoint evaluates.
"""
import json
import math
from pathlib import Path

import pytest

import evaluate
import export
import sample
import train
from conftest import real_checkpoint

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "data" / "heldout" / "python_docs.txt"


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_export_round_trip_smollm2(tmp_path, capsys):
    base = real_checkpoint("smollm2-135m-instruct")                    # bfloat16 on disk, float32 here
    ckpt, folder = tmp_path / "out", tmp_path / "sparse-model"
    # two steps from routers fitted to keep 80% of the routed FLOPs
    train.train(train.read_config([f"--init={base}", f"--out_dir={ckpt}", "--max_iters=2", "--batch_size=1",
                                   "--seq_len=64", "--val_data=", "--fit_windows=2", "--target_density=0.8",
                                   "--warmup_iters=1"]))
    export.main([f"--ckpt={ckpt}", f"--out={folder}", f"--text={TEXT}", "--seq_len=256", "--max_chunks=2",
                 "--dtype=float32"])
    capsys.readouterr()
    common = [f"--text={TEXT}", "--seq_len=256", "--max_chunks=2", "--json"]
    evaluate.main([f"--ckpt={ckpt}", *common])
    from_ckpt = last_json(capsys)
    evaluate.main([f"--init={folder}", *common])
    from_folder = last_json(capsys)
    rel = abs(from_folder["perplexity"] / from_ckpt["perplexity"] - 1)
    outputs = []
    for source in (f"--ckpt={ckpt}", f"--init={folder}"):
        sample.main([source, "--prompt=The for statement", "--temperature=0", "--max_new_tokens=24", "--no_color"])
        outputs.append(capsys.readouterr().out.splitlines()[0])
    with capsys.disabled():
        print(f"\nexport round trip: perplexity {from_ckpt['perplexity']:.6f} (--ckpt) vs "
              f"{from_folder['perplexity']:.6f} (exported), relative difference {rel:.1e}; dense "
              f"{from_ckpt['dense_perplexity']:.4f}; compute ratio {from_folder['compute_ratio']:.3f}; "
              f"greedy: {outputs[1]!r}")
    assert 0.05 < from_folder["density"] < 0.95                           # the routers decide something
    assert rel < 1e-4
    assert from_folder["compute_ratio"] == pytest.approx(from_ckpt["compute_ratio"], abs=1e-9)
    assert outputs[0] == outputs[1]


def test_bfloat16_conversion_smoke_smollm2(tmp_path, capsys):
    base = real_checkpoint("smollm2-135m-instruct")
    out = tmp_path / "out"
    train.train(train.read_config([f"--init={base}", f"--out_dir={out}", "--dtype=bfloat16", "--max_iters=2",
                                   "--batch_size=1", "--seq_len=64", "--val_data=", "--fit_windows=2",
                                   "--warmup_iters=1"]))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evaluate.main([f"--ckpt={out}", f"--text={TEXT}", "--seq_len=128", "--max_chunks=1", "--dtype=bfloat16", "--json"])
    res = last_json(capsys)
    with capsys.disabled():
        print(f"\nbfloat16: kl {[round(r['kl'], 4) for r in rows]}, density {[round(r['density'], 3) for r in rows]}; "
              f"held-out perplexity {res['perplexity']:.3f} (dense {res['dense_perplexity']:.3f}), "
              f"compute ratio {res['compute_ratio']:.3f}")
    assert len(rows) == 2 and all(math.isfinite(r[k]) for r in rows for k in ("kl", "l1", "density"))
    assert all(r["density"] < 1 and r["kl"] > 0 for r in rows)            # fitted gates start partly closed
    assert math.isfinite(res["perplexity"]) and res["dense_perplexity"] < 30
