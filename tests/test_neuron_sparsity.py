"""research/neuron_sparsity.py: what each token keeps, the FLOP count, the timed kernel, and a run
on a tiny model folder.

    python -m pytest tests/test_neuron_sparsity.py -q
"""
import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

import test_train
from flops import compute_ratio, sublayer_flops, visible_keys
from model import ModelConfig
from research import neuron_sparsity as ns

folder, corpus = test_train.folder, test_train.corpus     # module-scoped fixtures: a tiny llama, its texts


def test_each_row_keeps_its_k_largest_magnitudes_and_zeros_the_rest():
    torch.manual_seed(0)
    h = torch.randn(5, 3, 40)
    out = ns.keep_largest(h, 0.25)                             # round(0.25 · 40) = 10 per row
    kept = out != 0
    assert (kept.sum(-1) == 10).all()
    assert torch.equal(out[kept], h[kept])                     # kept values unchanged
    smallest_kept = torch.where(kept, h.abs(), torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, h.abs()).amax(-1)
    assert (smallest_kept > largest_dropped).all()
    assert torch.equal(ns.keep_largest(h, 1.0), h)
    assert (ns.keep_largest(h, 1e-6) != 0).sum(-1).eq(1).all()  # at least one


def test_blocks_are_kept_or_skipped_whole_by_their_summed_magnitude():
    a = torch.tensor([[0.1, 0.1, 5.0, -0.2, 1.0, 0.9, -0.3, 0.3]])   # blocks of 2: sums 0.2, 5.2, 1.9, 0.6
    assert ns.neuron_mask(a, 0.5, block=2).tolist() == [[False, False, True, True, True, True, False, False]]
    assert ns.neuron_mask(a, 0.25, block=2).tolist() == [[False, False, True, True, False, False, False, False]]
    assert ns.neuron_mask(a, 0.25).tolist() == [[False, False, True, False, True, False, False, False]]


def test_the_timed_kernel_computes_the_sparse_down_projection():
    torch.manual_seed(0)
    w = torch.randn(24, 64, dtype=torch.float64)               # a down weight (d, F)
    h = torch.randn(7, 64, dtype=torch.float64)
    for k in (1, 20, 64):
        expected = F.linear(ns.keep_largest(h, k / 64), w)
        assert torch.allclose(ns.gathered_down(h, w.t().contiguous(), k), expected, atol=1e-12)


def test_the_compute_ratio_counts_the_down_projection_at_keep_of_its_flops():
    cfg = ModelConfig(vocab_size=500, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=160,
                      max_seq_len=256)
    T = 128
    dense = sublayer_flops(cfg, 1)["head"]
    down = 0.0
    for layer in range(cfg.n_layers):
        f = sublayer_flops(cfg, visible_keys(cfg, layer, T))
        dense += f["q_o"] + f["kv"] + f["scores"] + f["mlp"]
        down += 2 * cfg.dim * cfg.ffn_dim
    assert ns.neuron_compute(cfg, T, {}, 1.0) == pytest.approx(1.0)
    assert ns.neuron_compute(cfg, T, {}, 0.4) == pytest.approx(1 - 0.6 * down / dense)
    # a routed model: a skipped MLP token has no down projection to thin out
    density = {(0, "mlp"): 0.0, (1, "mlp"): 0.5, (2, "attn"): 0.5}
    saved = 0.6 * 2 * cfg.dim * cfg.ffn_dim * (0.0 + 0.5 + 1.0)
    assert ns.neuron_compute(cfg, T, density, 0.4) == pytest.approx(compute_ratio(cfg, T, density) - saved / dense)
    # chosen by the gate, up and down both skip
    assert ns.neuron_compute(cfg, T, density, 0.4, "gate") == pytest.approx(
        compute_ratio(cfg, T, density) - 2 * saved / dense)


def test_a_run_reports_each_keep_and_leaves_the_model_as_it_was(folder, corpus):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ns.main([f"--init={folder}", f"--text={corpus / 'val' / 'c.txt'}", "--seq_len=32", "--max_chunks=3",
                 "--keeps=0.5,0.05", "--repeat=10", "--prompt_len=8", "--new_tokens=4", "--json"])
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert [r["keep"] for r in out["rows"]] == [1.0, 0.5, 0.05]
    assert out["rows"][0]["ppl_ratio"] == pytest.approx(1.0)  # the dense model against itself
    assert out["rows"][0]["compute_ratio"] == pytest.approx(1.0)
    assert out["rows"][2]["ppl_ratio"] != pytest.approx(1.0)  # keeping 1 of the tiny model's neurons shows
    assert out["rows"][1]["compute_ratio"] > out["rows"][2]["compute_ratio"]
    assert set(out["down_us"]) == {"1", "32"} and set(out["down_us"]["1"]) == {"dense", "0.5", "0.05"}
    assert set(out["decode"]) == {"0.5", "0.05"}
    assert all(t["same_tokens"] and t["dense_s"] > 0 and t["thinned_s"] > 0 for t in out["decode"].values())


def test_a_gathered_down_projection_is_the_masked_one(folder):
    import load_weights
    model, _ = load_weights.load(str(folder))
    down = model.layers[0].mlp.down
    torch.manual_seed(0)
    one, many = torch.randn(1, 1, down.in_features), torch.randn(2, 3, down.in_features)
    gathered = ns.GatheredDown(down, 0.3)
    with torch.no_grad():
        for h in (one, many):                                  # a decoding row gathered, more rows masked
            assert torch.allclose(gathered(h), down(ns.keep_largest(h, 0.3)), atol=1e-6)
        with ns.gathered(model, 0.3):
            assert isinstance(model.layers[1].mlp.down, ns.GatheredDown)
    assert model.layers[1].mlp.down is not None and not isinstance(model.layers[1].mlp.down, ns.GatheredDown)


def test_gate_selection_zeroes_the_neurons_of_smallest_gate(folder):
    import load_weights
    model, _ = load_weights.load(str(folder))
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, model.cfg.dim)
    with torch.no_grad():
        a, u = mlp.act(mlp.gate(x)), mlp.up(x)
        mask = a.abs() >= a.abs().topk(round(0.3 * a.shape[-1]), dim=-1).values[..., -1:]
        expected = mlp.down(a * u * mask)
        with ns.sparse_mlp(model, 0.3, "gate"):
            found = mlp(x)
    assert torch.allclose(found, expected, atol=1e-6)
    assert not torch.allclose(found, mlp(x).detach(), atol=1e-6)


def test_the_hooks_come_off(folder):
    import load_weights
    model, _ = load_weights.load(str(folder))
    x = torch.randint(0, model.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        before = model(x)[0]
        with ns.sparse_mlp(model, 0.1):
            during = model(x)[0]
        after = model(x)[0]
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)


def test_bad_options_are_refused(folder, corpus):
    with pytest.raises(ValueError, match="--text"):
        ns.main([f"--init={folder}"])
    with pytest.raises(ValueError, match="--select"):
        ns.main([f"--init={folder}", "--text=x.txt", "--select=up"])
    with pytest.raises(ValueError, match="--block=5 does not divide"):
        ns.main([f"--init={folder}", f"--text={corpus / 'val' / 'c.txt'}", "--block=5", "--repeat=0"])
    with pytest.raises(ValueError, match="--new_tokens=1 leaves no decoding step"):
        ns.main([f"--init={folder}", "--text=x.txt", "--new_tokens=1"])
    with pytest.raises(ValueError, match="--gates=peek needs"):
        ns.main([f"--init={folder}", "--text=x.txt", "--gates=peek"])
    with pytest.raises(ValueError, match="--gates=random needs"):
        ns.main([f"--init={folder}", "--text=x.txt", "--gates=random"])
    with pytest.raises(ValueError, match="keeps"):
        ns.main([f"--init={folder}", "--text=x.txt", "--keeps=0"])


def test_thinning_can_follow_the_lora_switch(folder):
    import load_weights
    import lora
    model, _ = load_weights.load(str(folder))
    lora.inject(model, ["down"], rank=2)                       # B = 0: LoRA on is still the base model
    adapters = lora.adapters(model)
    x = torch.randint(0, model.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        base = model(x)[0]
        with ns.sparse_mlp(model, 0.1, when=lambda: adapters[0].enabled):
            student = model(x)[0]
            with lora.disabled(model):
                teacher = model(x)[0]
    assert torch.equal(teacher, base)
    assert not torch.allclose(student, base)


def test_a_routed_checkpoint_is_thinned_under_learned_and_random_gates(folder, corpus, tmp_path):
    import train
    train.train(train.read_config(test_train.args(folder, corpus, tmp_path / "run")))
    found = {}
    for g in ("learned", "random", "peek"):                    # the checkpoint, thinned, under each gates
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ns.main([f"--ckpt={tmp_path / 'run'}", f"--text={corpus / 'val' / 'c.txt'}", "--seq_len=16",
                     "--max_chunks=4", "--keeps=0.3", "--select=gate", "--repeat=0", f"--gates={g}", "--json"])
        found[g] = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert [r["keep"] for r in found["random"]["rows"]] == [1.0, 0.3]
    assert found["random"]["rows"][1]["ppl_ratio"] != found["learned"]["rows"][1]["ppl_ratio"]
    assert found["peek"]["gates"] == "peek"
    assert found["peek"]["rows"][0]["compute_ratio"] == pytest.approx(0.9, abs=0.01)   # --target_compute, unthinned
    for g in found:   # routed: below 1 even in full; thinned: lower still
        assert found[g]["rows"][1]["compute_ratio"] < found[g]["rows"][0]["compute_ratio"] < 1


def test_blocks_count_the_share_they_keep(folder, corpus):
    import load_weights
    cfg = load_weights.load(str(folder))[0].cfg
    blocks = cfg.ffn_dim // 32                                 # keep 0.5 of 3 blocks keeps 2 of them
    assert blocks == 3
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ns.main([f"--init={folder}", f"--text={corpus / 'val' / 'c.txt'}", "--seq_len=32", "--max_chunks=2",
                 "--keeps=0.5", "--block=32", "--select=gate", "--repeat=0", "--json"])
    row = json.loads(buf.getvalue().strip().splitlines()[-1])["rows"][1]
    assert row["compute_ratio"] == pytest.approx(ns.neuron_compute(cfg, 32, {}, 2 / 3, "gate"))


def test_train_mlp_keep_thins_the_student_for_the_whole_run_and_not_the_teacher(folder, corpus, tmp_path):
    import lora
    import router
    import train

    def run(name, **over):
        return train.train(train.read_config(test_train.args(folder, corpus, tmp_path / name, **over)))

    full, thinned = run("full"), run("thin", mlp_keep=0.3)
    x, h = torch.randint(3, 64, (1, 12)), {}
    hook = thinned.layers[0].mlp.down.register_forward_pre_hook(lambda _, args: h.update(x=args[0].clone()))
    with torch.no_grad():
        thinned(x, routers_off=True)                            # the student: LoRA on, thinned
        student = h.pop("x")
        with lora.disabled(thinned):
            thinned(x, routers_off=True)                        # the teacher: LoRA off, in full
        teacher = h.pop("x")
    hook.remove()
    n = round(0.3 * thinned.cfg.ffn_dim)
    assert ((student != 0).sum(-1) == n).all() and ((teacher != 0).sum(-1) > n).all()
    # the routers trained with the thinning: other biases than the same run's without it
    biases = [[r.proj.bias.item() for _, _, r in router.routers(m)] for m in (full, thinned)]
    assert biases[0] != biases[1]
    with pytest.raises(ValueError, match="--lora_rank > 0"):
        run("no_lora", mlp_keep=0.5, lora_rank=0)
    # loaded by the core (sample.py, evaluate.py, ...), it runs in full, and says so
    import checkpoint
    with pytest.warns(UserWarning, match="trained with --mlp_keep=0.3: .* with every MLP neuron"):
        checkpoint.load_sparse(tmp_path / "thin")
