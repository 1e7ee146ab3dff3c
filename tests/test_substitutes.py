"""Skip substitutes (router.Substitute): what a skipped token adds instead of 0.

    python -m pytest tests/test_substitutes.py -q

h = h + g·f(x) + (1 - g)·s(x) wherever a gate acts. What is checked, on tiny random models:
- a sublayer every token skips adds exactly s(x) (compacted path), and none (None) adds 0;
- the masked and the compacted paths give the same logits, and cached decoding (batch 1: the
  plain-branch step; batch 2: compaction) the tokens and logits of recomputation, for every
  family, route and kv mode;
- the least-squares fit: the mean at rank 0, ordinary least squares at full rank without a
  ridge, a reduced-rank fit between them; the routers' fit target becomes what a skip loses;
- the FLOP model counts a substitute's two matmuls per skipped token (FlopCounterMode);
- the peek rule with substitutes by hand; a train.py run with --substitute trains their A and b
  (not B, the fitted directions), saves them, and its checkpoint loads with them.
"""
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
import controller
import gates
import router
import train
from flops import compute_ratio, sublayer_flops
from test_router import FAMILIES, random_routers, tiny_model, tokens
from test_train import args, corpus, folder  # noqa: F401  (fixtures)


def with_substitutes(model, rank, route="sublayer", kv="all", sinks=True, seed=3):
    """Random routers (about half the tokens skip) and random substitutes of the given rank."""
    router.add_routers(model, route, kv, sinks=sinks, substitute=rank)
    random_routers(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, s in router.substitutes(model):
            for p in s.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("rank", [None, 0, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_sublayer_every_token_skips_adds_its_substitute(family, rank):
    """Closed MLP routers, no sinks: every token's MLP output is s(mlp_norm(h)) (or 0)."""
    model = with_substitutes(tiny_model(family), rank, "mlp", sinks=False)
    with torch.no_grad():
        for _, _, r in router.routers(model):
            r.proj.weight.zero_()
            r.proj.bias.fill_(-1.0)
    idx = tokens()
    inputs, hooks = {}, []
    for block in model.layers:                      # the reference: the dense pass, f(x) replaced
        hooks.append(block.mlp_norm.register_forward_hook(lambda m, a, x, b=block: inputs.__setitem__(b, x)))
        hooks.append(block.mlp_post_norm.register_forward_hook(
            lambda m, a, y, b=block: torch.zeros_like(y) if b.mlp_skip is None else b.mlp_skip(inputs[b])))
    with torch.no_grad():
        expected, _ = model(idx, routers_off=True)
        for hook in hooks:
            hook.remove()
        logits, records = model(idx)
    assert not any(r.keep.any() for r in records)
    torch.testing.assert_close(logits, expected)
    assert (rank is None) == all(b.mlp_skip is None for b in model.layers)


@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("route", ["sublayer", "block"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_and_compacted_paths_agree_with_substitutes(family, route, kv):
    model = with_substitutes(tiny_model(family), 4, route, kv)
    idx = tokens()
    with torch.no_grad():
        masked, m_records = model(idx, masked=True)
        compacted, c_records = model(idx)
    assert len(m_records) == len(c_records) > 0
    assert all(torch.equal(m.keep, c.keep) for m, c in zip(m_records, c_records))
    assert 0.2 < float(torch.cat([r.keep for r in c_records]).float().mean()) < 0.9
    torch.testing.assert_close(compacted, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_with_substitutes_equals_recomputation(family, kv, B):
    model = with_substitutes(tiny_model(family), 4, "sublayer", kv)
    idx = tokens(B=B, T=12)
    with torch.no_grad():
        cache = model.new_cache(B, 12)
        model(idx[:, :4], cache=cache)                                   # a prefill, then one token at a time
        for t in range(4, 12):
            want, want_records = model(idx[:, :t + 1], masked=True)
            out, records = model(idx[:, t:t + 1], cache=cache)
            torch.testing.assert_close(out[:, -1], want[:, -1], rtol=1e-4, atol=1e-4)
            assert len(records) == len(want_records) > 0
            assert all(torch.equal(r.keep, w.keep[:, -1:]) for r, w in zip(records, want_records))


def test_the_masked_path_gives_routers_the_gradient_of_what_a_skip_loses():
    """dL/dz = sigmoid'(z) <dL/dh, f(x) - s(x)> per token, by hand (f alone would be another number)."""
    model = with_substitutes(tiny_model(), 4, "mlp", "all")
    block = model.layers[0]
    seen = {}
    block.mlp_router.register_forward_hook(lambda m, args, z: seen.setdefault("z", z))
    block.mlp_post_norm.register_forward_hook(lambda m, args, out: seen.setdefault("f", out))
    block.mlp_skip.register_forward_hook(lambda m, args, out: seen.setdefault("s", out))
    model.layers[1].attn_norm.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    logits, _ = model(tokens(), masked=True)
    seen["z"].retain_grad()
    seen["h"].retain_grad()
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    z, dh = seen["z"].detach(), seen["h"].grad
    f, s = seen["f"].detach(), seen["s"].detach()
    sig = torch.sigmoid(z)
    dz = sig * (1 - sig) * (dh * (f - s)).sum(-1)                        # (B, T)
    dz[:, 0] = 0                                                       # the sink's logit is pinned
    torch.testing.assert_close(seen["z"].grad, dz)
    assert (dz[:, 1:].abs() > 1e-6).float().mean() > 0.5                 # not vacuous
    assert not torch.allclose(dz, sig * (1 - sig) * (dh * f).sum(-1), atol=1e-5)   # s(x) takes part
    assert block.mlp_skip.bias.grad.abs().sum() > 0                       # the substitute learns too


# ----------------------------------------------------------------------------------------------
# The least-squares fit
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, 4, 32])
def test_fit_substitutes_is_least_squares(rank):
    """Rank 0: the mean output; full rank (32, no ridge): least squares with an intercept; a
    lower rank r: the best rank-r fit, whose error is least squares' plus what the fitted values
    (centred) hold outside their top r singular directions (Eckart-Young). Position 0 (a sink)
    is left out."""
    model = router.add_routers(tiny_model(), "sublayer", "all", substitute=rank)
    batches = [tokens(seed=s) for s in (5, 6)]
    controller.fit_substitutes(model, batches, ridge=0.0)
    found = list(controller.sublayers(model, batches))
    for layer, kind, s in router.substitutes(model):
        x = torch.cat([io[(layer, kind)][1] for io in found])                   # (N, d)
        y = torch.cat([io[(layer, kind)][2] for io in found])
        with torch.no_grad():
            err = (s(x) - y).square().sum()
        mean_err = (y - y.mean(0)).square().sum()
        xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        lstsq = xa @ torch.linalg.lstsq(xa, y.double()).solution
        ols_err = (lstsq - y.double()).square().sum()
        if rank == 0:
            torch.testing.assert_close(s.bias, y.mean(0))
        elif rank == 32:
            assert float(err) == pytest.approx(float(ols_err), rel=1e-3)
        else:
            assert ols_err < err < mean_err
            fitted = torch.linalg.svdvals(lstsq - lstsq.mean(0))              # descending
            best = ols_err + fitted[rank:].square().sum()                      # the optimal rank-r error
            assert float(err) == pytest.approx(float(best), rel=1e-5)


def test_fit_routers_targets_what_a_skip_loses_with_substitutes():
    model = router.add_routers(tiny_model(), "sublayer", "all", substitute=4)
    batches = [tokens(seed=5)]
    controller.fit_substitutes(model, batches)
    savings = {"attn": 3.0, "mlp": 5.0}
    controller.fit_routers(model, batches, savings, ridge=0.0)
    found, = controller.sublayers(model, batches)
    for layer, kind, r in router.routers(model):
        h, x, y = found[(layer, kind)]
        with torch.no_grad():
            target = router.log_move(h, y - getattr(model.layers[layer], f"{kind}_skip")(x))
            z = r(x[None])[0] + math.log(savings[kind])
        xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        torch.testing.assert_close(z.double(), xa @ torch.linalg.lstsq(xa, target.double()[:, None]).solution[:, 0],
                                   rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# FLOPs, the peek rule, training and checkpoints
# ----------------------------------------------------------------------------------------------

def test_a_substitute_costs_its_two_matmuls_per_skipped_token():
    model = router.add_routers(tiny_model(), "sublayer", "all", substitute=4)
    s, x = model.layers[0].mlp_skip, torch.randn(10, model.cfg.dim)
    with FlopCounterMode(display=False) as counter:
        s(x)
    assert counter.get_total_flops() == 10 * sublayer_flops(model.cfg, 1)["substitute"] == 10 * 4 * 4 * model.cfg.dim
    half = {(l, k): 0.5 for l, k, _ in router.routers(model)}            # half of every sublayer skips
    with_sub = compute_ratio(model.cfg, 16, half)
    model.cfg.substitute = None
    without = compute_ratio(model.cfg, 16, half)
    layer = sum(sublayer_flops(model.cfg, 8.5)[k] for k in ("q_o", "kv", "scores", "mlp"))   # 8.5 keys: causal 16
    dense = model.cfg.n_layers * layer + sublayer_flops(model.cfg, 1)["head"]
    skipped = 0.5 * 2 * model.cfg.n_layers                                # skipped sublayers per token
    assert with_sub - without == pytest.approx(skipped * 4 * 4 * model.cfg.dim / dense)


def test_peek_rule_with_substitutes_by_hand():
    """Keep iff log(|f(x) - s(x)| / |h|) > t; a skipped token's MLP adds s(x), a kept one f(x)."""
    model = with_substitutes(tiny_model(), 4, "mlp", "all")
    idx = tokens()
    block, seen = model.layers[0], {}
    block.mlp_norm.register_forward_hook(lambda m, a, x: seen.update(h=a[0], x=x))
    block.mlp_post_norm.register_forward_hook(lambda m, a, y: seen.update(y=y))     # before the rule's hook
    block.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        model(idx, routers_off=True)
        lost = router.log_move(seen["h"], seen["y"] - block.mlp_skip(seen["x"]))
        threshold = float(lost[:, 1:].median())
        with gates.forced(model, {(0, "mlp"): ("peek", threshold), (1, "mlp"): "open"}):
            _, records = model(idx, masked=True)
        expected = lost > threshold
        expected[:, 0] = True
        assert torch.equal(records[0].keep, expected)
        added = torch.where(expected[..., None], seen["y"], block.mlp_skip(seen["x"]))
        torch.testing.assert_close(seen["out"], seen["h"] + added)


def test_training_with_substitutes_saves_and_loads_them(folder, corpus, tmp_path):
    out = tmp_path / "out"
    model = train.train(train.read_config(args(folder, corpus, out, substitute=4)))
    saved = checkpoint.trained_parameters(model)
    assert any(".mlp_skip.down" in n for n in saved) and any(".attn_skip.bias" in n for n in saved)
    loaded, _, meta = checkpoint.load_sparse(out)
    assert meta["model_config"]["substitute"] == 4
    idx = tokens(vocab=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0])
    with pytest.raises(ValueError, match="substitute"):
        train.read_config(args(folder, corpus, out, init="resume", substitute=8))


def test_training_moves_a_substitutes_a_and_b_and_keeps_its_fitted_directions(folder, corpus, tmp_path, monkeypatch):
    fitted = {}

    def fit_and_keep(model, batches, *a, **k):
        controller.fit_substitutes(model, batches, *a, **k)
        fitted.update({n: p.detach().clone() for n, p in router.named_parameters(model).items() if "_skip." in n})
    monkeypatch.setattr(train, "fit_substitutes", fit_and_keep)
    model = train.train(train.read_config(args(folder, corpus, tmp_path / "out", substitute=4, max_iters=4)))
    trained = router.named_parameters(model)
    for kind in ("down", "bias", "up"):
        names = [n for n in fitted if n.endswith(f"_skip.{kind}")]
        assert len(names) == 2 * model.cfg.n_layers
        moved = [not torch.equal(trained[n].detach(), fitted[n]) for n in names]
        # A and b train where tokens skipped; B (up), the fit's r unit directions, stays
        assert any(moved) if kind != "up" else not any(moved), kind


@pytest.mark.parametrize("bad", ["-1", "1.5", "many", "999"])
def test_a_bad_substitute_is_a_clear_error(folder, corpus, tmp_path, bad):
    with pytest.raises(ValueError, match="substitute"):
        train.train(train.read_config(args(folder, corpus, tmp_path / "out", substitute=bad)))


def test_the_default_adds_rank_8_and_none_is_the_papers_zero(folder, corpus, tmp_path):
    assert train.read_config(args(folder, corpus, tmp_path / "a"))["substitute"] == 8
    assert train.read_config(args(folder, corpus, tmp_path / "b", substitute="none"))["substitute"] is None


def test_an_exported_folder_carries_its_substitutes(folder, corpus, tmp_path):
    """export.py writes the substitutes beside the routers and names their rank in config.json;
    the folder loads as the same sparse model (LoRA merged)."""
    import export
    import load_weights
    import lora
    out = tmp_path / "out"
    train.train(train.read_config(args(folder, corpus, out, substitute=2, max_iters=2)))
    export.main([f"--ckpt={out}", f"--out={tmp_path / 'sparse'}", f"--text={corpus / 'val' / 'c.txt'}", "--seq_len=16"])
    exported, _ = load_weights.load(str(tmp_path / "sparse"))
    assert exported.cfg.substitute == 2 and len(router.substitutes(exported)) == 2 * exported.cfg.n_layers
    model, _, _ = checkpoint.load_sparse(out)
    lora.merge(model)
    idx = tokens(vocab=64)
    with torch.no_grad():
        torch.testing.assert_close(exported(idx)[0], model(idx)[0], rtol=1e-4, atol=1e-4)


def test_bench_counts_the_substitutes_in_the_ideal_speedup(folder, corpus, capsys):
    """bench.py --substitute: random gates whose skips add a rank-r map; the same draws as without
    (so the same densities), and an ideal speedup lowered by the substitutes' FLOPs."""
    import bench
    rows = {}
    for rank in ("None", "16"):
        bench.main([f"--init={folder}", f"--text={corpus / 'val' / 'c.txt'}", "--densities=0.5", "--kv=all",
                    "--prefill=1x32", "--prompt_len=8", "--new_tokens=2", "--repeat=1", "--threads=1",
                    f"--substitute={rank}", "--json"])
        rows[rank] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for plain, sub in zip(rows["None"], rows["16"]):
        assert plain["density"] == sub["density"] and 0 < sub["density"] < 1
        assert sub["ideal_speedup"] < plain["ideal_speedup"]
