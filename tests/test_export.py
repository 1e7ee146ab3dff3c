"""tests/test_export.py — export.py's standalone sparse folder, on tiny model folders.

A checkpoint is fabricated as train.py writes one (routers with random weights, about half the
gates closed; LoRA B nonzero), exported, and the folder is checked: evaluate.py and sample.py on it
give the checkpoint's perplexity and greedy tokens; transformers loads it as the dense model
with LoRA merged; shards and index follow the Hub's layout; an export that fails leaves nothing.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import bench
import checkpoint
import evaluate
import export
import load_weights
import lora
import sample
from conftest import tiny_model_folder, word_text_file
from test_cli import ADDS_BOS, FAMILIES, SEQ_LEN, make_checkpoint


@pytest.fixture(scope="module", params=list(FAMILIES))
def base(request, tiny_hf, tmp_path_factory):
    """A tiny model folder (LLaMA without BOS, Gemma 3 with BOS and sliding layers)."""
    return tiny_model_folder(tiny_hf, tmp_path_factory, request.param, ADDS_BOS[request.param],
                             **FAMILIES[request.param])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return word_text_file(tmp_path_factory, "heldout", 300, seed=1)


@pytest.fixture(scope="module")
def exported(base, text_file, tmp_path_factory):
    """(checkpoint folder, exported folder) of one fabricated checkpoint."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "ckpt", base, lora_std=0.3)
    export.main([f"--ckpt={ckpt}", f"--out={root / 'sparse'}", f"--text={text_file}", f"--seq_len={SEQ_LEN}"])
    return ckpt, root / "sparse"


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_folder_has_the_base_config_weights_names_and_tokenizer(base, exported):
    _, folder = exported
    assert {p.name for p in folder.iterdir()} == {p.name for p in base.iterdir()} | {"README.md", "routers.safetensors"}
    config, base_config = (json.loads((f / "config.json").read_text()) for f in (folder, base))
    section = config.pop(load_weights.SPARSE_SECTION)
    assert config == base_config                                          # untouched besides the section
    assert (section["route"], section["kv"], section["sinks"], section["router_file"]) == (
        "sublayer", "all", True, "routers.safetensors")
    assert 0.2 < section["compute_ratio"] < 1
    with safe_open(str(folder / "model.safetensors"), "pt") as a, safe_open(str(base / "model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_slice(k).get_dtype() == b.get_slice(k).get_dtype() for k in a.keys())
        q, v, k = (f"model.layers.0.self_attn.{p}_proj.weight" for p in "qvk")
        assert not torch.equal(a.get_tensor(q), b.get_tensor(q))         # LoRA on wq and wv merged in
        assert not torch.equal(a.get_tensor(v), b.get_tensor(v))
        assert torch.equal(a.get_tensor(k), b.get_tensor(k))             # no adapter on wk
    assert (folder / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert f"{section['compute_ratio']:.3f}" in (folder / "README.md").read_text()


def test_eval_and_sample_round_trip(exported, text_file, capsys):
    """evaluate.py --init=EXPORTED = evaluate.py --ckpt=CKPT (perplexity, density); sample.py: same greedy tokens."""
    ckpt, folder = exported
    common = [f"--text={text_file}", f"--seq_len={SEQ_LEN}", "--json"]
    evaluate.main([f"--ckpt={ckpt}", *common])
    from_ckpt = last_json(capsys)
    evaluate.main([f"--init={folder}", *common])
    from_folder = last_json(capsys)
    assert from_folder["tokens"] == from_ckpt["tokens"]
    assert from_folder["perplexity"] == pytest.approx(from_ckpt["perplexity"], rel=1e-4)
    assert from_folder["perplexity"] != pytest.approx(from_ckpt["dense_perplexity"], rel=1e-3)  # sparse, not dense
    for key in ("density_attn", "density_mlp", "compute_ratio"):
        assert from_folder[key] == pytest.approx(from_ckpt[key], abs=1e-9), key
    assert from_folder["density"] < 0.9
    outputs = []
    for source in (f"--ckpt={ckpt}", f"--init={folder}"):
        sample.main([source, "--prompt=the cat sat", "--temperature=0", "--max_new_tokens=12", "--no_color"])
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0][0] == outputs[1][0]                                 # tokens, each with its share of compute
    assert "compute ratio" in outputs[1][-1]


@torch.no_grad()
def test_the_loaded_folder_is_the_checkpoints_sparse_model(exported):
    ckpt, folder = exported
    sparse, _, _ = checkpoint.load_sparse(ckpt)
    lora.merge(sparse)
    model, _ = load_weights.load(str(folder))
    x = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    (a, rec_a), (b, rec_b) = sparse(x), model(x)
    assert torch.equal(a, b)
    assert [r.keep.tolist() for r in rec_a] == [r.keep.tolist() for r in rec_b]
    assert not all(r.keep.all() for r in rec_b)                            # routers are on


@torch.no_grad()
def test_a_checkpoint_without_sinks_exports_without_them(exported, text_file, tmp_path):
    ckpt, _ = exported
    shutil.copytree(ckpt, tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / checkpoint.CKPT_JSON
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["sinks"] = False                                 # position 0 may skip too
    meta_path.write_text(json.dumps(meta))
    export.main([f"--ckpt={tmp_path / 'ckpt'}", f"--out={tmp_path / 'out'}", f"--text={text_file}",
                 f"--seq_len={SEQ_LEN}"])
    sparse, _, _ = checkpoint.load_sparse(tmp_path / "ckpt")
    lora.merge(sparse)
    model, _ = load_weights.load(str(tmp_path / "out"))
    assert model.cfg.sinks is False
    x = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    (a, _), (b, rec_b) = sparse(x), model(x)
    assert torch.equal(a, b)
    assert not all(bool(r.keep[:, 0].all()) for r in rec_b)               # position 0 skipped somewhere


@torch.no_grad()
def test_transformers_loads_it_as_the_dense_merged_model(exported):
    from transformers import AutoModelForCausalLM
    ckpt, folder = exported
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model, _ = load_weights.load(str(folder))
    x = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    dense = model(x, routers_off=True)[0]
    torch.testing.assert_close(ref(x).logits, dense, rtol=1e-4, atol=1e-4)
    base, _ = load_weights.load(checkpoint.read_checkpoint_meta(ckpt)["base"])
    assert (base(x)[0] - dense).abs().max() > 1e-2                        # the merge changed the model


def test_sharded_export_loads_the_same(exported, text_file, tmp_path):
    ckpt, folder = exported
    out = tmp_path / "sharded"
    export.main([f"--ckpt={ckpt}", f"--out={out}", f"--text={text_file}", f"--seq_len={SEQ_LEN}",
                 "--shard_size=20KB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    sizes = {}
    for name in shards:
        with safe_open(str(out / name), "pt") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == name for k in keys)
            sizes[name] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
            assert len(keys) == 1 or sizes[name] <= 20_000                # over the limit only when alone
    assert index["metadata"]["total_size"] == sum(sizes.values())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())
    x = torch.randint(3, 64, (1, 10))
    torch.testing.assert_close(load_weights.load(str(out))[0](x)[0], load_weights.load(str(folder))[0](x)[0],
                               rtol=0, atol=0)


def test_dtype_override(exported, text_file, tmp_path):
    ckpt, folder = exported
    out = tmp_path / "bf16"
    export.main([f"--ckpt={ckpt}", f"--out={out}", f"--text={text_file}", f"--seq_len={SEQ_LEN}", "--dtype=bfloat16"])
    with safe_open(str(out / "model.safetensors"), "pt") as a, safe_open(str(folder / "model.safetensors"), "pt") as b:
        assert {a.get_slice(k).get_dtype() for k in a.keys()} == {"BF16"}
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k).bfloat16()), k   # the float32 export, rounded
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_plan_shards_keeps_order_and_limit():
    entries = [(name, size, None) for name, size in zip("abcdef", (4, 4, 3, 12, 1, 8))]
    groups = export.plan_shards(entries, 10)
    assert [[e[0] for e in g] for g in groups] == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert export.parse_size("5GB") == 5_000_000_000 and export.parse_size("20KB") == 20_000
    with pytest.raises(ValueError, match="shard_size"):
        export.parse_size("five")


def test_bench_runs_learned_gates_of_an_exported_folder(exported, text_file, capsys):
    _, folder = exported
    bench.main([f"--init={folder}", f"--text={text_file}", "--densities=1", "--kv=all", "--prefill=1x8",
                "--prompt_len=4", "--new_tokens=2", "--repeat=1", "--threads=1", "--json"])
    rows = last_json(capsys)
    learned = [r for r in rows if r["gates"] == "learned"]
    assert len(learned) == 2 and all(r["density"] < 0.9 for r in learned)


def test_bench_random_weights_builds_a_preset_without_its_files(monkeypatch, capsys):
    """--random_weights: the preset's shapes with random weights and random ids (no folder, no
    tokenizer, no download), and the same rows as a loaded model; misuse is named."""
    monkeypatch.setitem(bench.PRESETS, "tiny-llama", dict(vocab_size=300, dim=32, n_layers=2, n_heads=4,
                                                         n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=64))
    monkeypatch.setattr(load_weights, "resolve", lambda *a, **k: pytest.fail("--random_weights read a folder"))
    bench.main(["--init=tiny-llama", "--random_weights=True", "--densities=1,0.5", "--kv=all", "--prefill=1x32",
                "--prompt_len=8", "--new_tokens=4", "--repeat=1", "--threads=1", "--json"])
    rows = last_json(capsys)
    assert [(r["mode"], r["density"] == 1.0) for r in rows] == [("prefill", True), ("decode", True),
                                                                ("prefill", False), ("decode", False)]
    assert 0.2 < rows[2]["density"] < 0.8 and rows[2]["ideal_speedup"] > 1
    for argv, message in ((["--init=nope"], "not one of"), (["--init=tiny-llama", "--ckpt=out"], "drop --ckpt"),
                          (["--init=tiny-llama", "--load_rss=True"], "drop --ckpt and --load_rss"),
                          (["--init=tiny-llama", "--vs_hf=True"], "unknown option --vs_hf; valid options"),
                          (["--init=tiny-llama", "--device=cuda", "--clock=cpu"], "use --clock=wall")):
        with pytest.raises(ValueError, match=message):
            bench.main(argv + ["--random_weights=True"])


def test_bench_clock_cpu_times_with_process_seconds(monkeypatch, capsys):
    """--clock=cpu: every timed function reads the clock it is given (timing.make_clock picks it)."""
    import time
    import timing
    assert timing.make_clock("cpu") is time.process_time and timing.make_clock("wall") is time.perf_counter
    read = []
    monkeypatch.setattr(time, "process_time", lambda: read.append(1) or len(read) * 1e-3)
    monkeypatch.setitem(bench.PRESETS, "tiny-llama", dict(vocab_size=300, dim=32, n_layers=2, n_heads=4,
                                                         n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=64))
    bench.main(["--init=tiny-llama", "--random_weights=True", "--densities=0.5", "--kv=all", "--prefill=1x16",
                "--prompt_len=8", "--new_tokens=2", "--repeat=1", "--threads=1", "--clock=cpu", "--json"])
    rows = last_json(capsys)
    assert len(rows) == 2 and read                                        # prefill and decode, on the CPU clock
    assert all(r["dense_s"] > 0 and r["sparse_s"] > 0 for r in rows)
    ticks = [r[key] / 1e-3 for r in rows for key in ("dense_s", "sparse_s")]   # the fake clock's, not real time
    assert all(abs(t - round(t)) < 1e-6 for t in ticks), ticks


def test_bench_names_the_cpu_settings_it_ran_under(monkeypatch):
    """timing.where: bench.py's first line says which OpenMP and glibc allocator settings were set."""
    import timing
    for k in [k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "OMP_WAIT_POLICY")]:
        monkeypatch.delenv(k)
    assert timing.where("cpu", 2) == "2 threads (OMP_WAIT_POLICY=unset)"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "8")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4")
    assert timing.where("cpu", 1) == ("1 threads (OMP_WAIT_POLICY=PASSIVE, GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4, "
                                      "MALLOC_TRIM_THRESHOLD_=8)")


def test_failed_export_leaves_no_folder_and_full_out_is_refused(exported, text_file, tmp_path, monkeypatch):
    ckpt, _ = exported
    out = tmp_path / "half"

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(export, "copy_tokenizer", broken)                # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        export.main([f"--ckpt={ckpt}", f"--out={out}", f"--text={text_file}", f"--seq_len={SEQ_LEN}"])
    assert list(tmp_path.iterdir()) == []                                  # no final folder, no temporary one
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export.main([f"--ckpt={ckpt}", f"--out={out}", f"--text={text_file}", f"--seq_len={SEQ_LEN}"])
    assert (out / "x").read_text() == "keep me"
