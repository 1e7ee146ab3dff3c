"""tests/test_prune.py — the static baselines (research/prune.py, train.py --prune) on a tiny model.

Checks the three measures against sublayers made harmless by hand (zero output: KL 0 and Block
Influence 0, ranked first) and against each measure written out here, the removal order and where
it stops, that static gates skip the removed sublayers for every token but the sinks, and a --prune
run end to end: the routers do not move, LoRA does, prune.json holds the ranking, and a second run
removes by the ranking it is given (--prune_scores), not by one of its own; and the hybrid
(--prune_routed) closes the removed sublayers and routes the others.
"""
import json

import pytest
import torch

import checkpoint
import gates
import load_weights
import router
import train
from conftest import tiny_model_folder
from flops import compute_ratio
from research import prune
from scoring import method
from test_train import args, corpus  # noqa: F401  (the corpus fixture)


@pytest.fixture(scope="module")
def folder(tiny_hf, tmp_path_factory):
    return tiny_model_folder(tiny_hf, tmp_path_factory, "llama", num_hidden_layers=3)


def routed_model(folder):
    model, _ = load_weights.load(str(folder))
    return router.add_routers(model)


def silence(model, layer: int, kind: str):
    """Make one sublayer's output exactly zero (its last projection's weights 0)."""
    block = model.layers[layer]
    with torch.no_grad():
        (block.attn.wo if kind == "attn" else block.mlp.down).weight.zero_()


def by_hand(model, batches, by: str) -> float:
    """The score of sublayer (0, "attn"), written out here: the mean KL(dense || without it) of the
    next-token distributions, or the mean over tokens (position 0 left out) of 1 - cos(h, h + f(x))."""
    found = []
    for x in batches:
        with torch.no_grad():
            if by == "kl":
                dense = model(x, routers_off=True)[0].float().log_softmax(-1)                # (B, T, V)
                with gates.forced(model, {(l, k): 0.0 if (l, k) == (0, "attn") else "open"
                                          for l, k, _ in router.routers(model)}):
                    pruned = model(x)[0].float().log_softmax(-1)
                found.append(float((dense.exp() * (dense - pruned)).sum(-1).mean()))
            else:
                seen = {}
                hooks = [model.layers[0].register_forward_pre_hook(lambda m, a: seen.update(before=a[0])),
                         model.layers[0].mlp_norm.register_forward_pre_hook(lambda m, a: seen.update(after=a[0]))]
                model(x, routers_off=True)
                for hook in hooks:
                    hook.remove()
                cos = torch.nn.functional.cosine_similarity(seen["before"][:, 1:], seen["after"][:, 1:], dim=-1)
                found.append(float((1 - cos).mean()))
    return sum(found) / len(found)


@pytest.mark.parametrize("by", ["kl", "bi"])
def test_a_silent_sublayer_scores_zero_and_goes_first(folder, by, monkeypatch):
    monkeypatch.setattr(prune, "HEAD_ROWS", 5)                            # the KL's logits in several chunks
    model = routed_model(folder)
    silence(model, 1, "mlp")
    batches = [torch.randint(3, 64, (2, 12)) for _ in range(2)]
    scores = prune.rank(model, batches, by)
    assert len(scores) == 2 * model.cfg.n_layers
    assert scores[(1, "mlp")] == pytest.approx(0.0, abs=1e-6)
    assert min(v for k, v in scores.items() if k != (1, "mlp")) > 1e-4     # every other sublayer matters
    assert sorted(scores, key=scores.get)[0] == (1, "mlp")
    assert scores[(0, "attn")] == pytest.approx(by_hand(model, batches, by), rel=1e-4)   # the measure itself


def test_layer_ranking_scores_whole_blocks(folder):
    """A block's score is 1 - cos(its input, its output): from before its attention to after its MLP."""
    model = routed_model(folder)
    silence(model, 0, "attn")                                             # block 0 turns by its MLP alone
    silence(model, 1, "mlp")                                              # block 1 by its attention alone
    silence(model, 2, "attn")
    silence(model, 2, "mlp")
    x = torch.randint(3, 64, (2, 12))
    scores = prune.rank(model, [x], "layer")
    assert set(scores) == {(l, "block") for l in range(3)}
    assert scores[(2, "block")] == pytest.approx(0.0, abs=1e-6)
    assert min(scores[(0, "block")], scores[(1, "block")]) > 1e-4
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, (a[0], out)))
             for l, b in enumerate(model.layers)]
    with torch.no_grad():
        model(x, routers_off=True)
    for hook in hooks:
        hook.remove()
    for l, (before, after) in seen.items():
        turn = 1 - torch.nn.functional.cosine_similarity(before[:, 1:], after[:, 1:], dim=-1).mean()
        assert scores[(l, "block")] == pytest.approx(float(turn), rel=1e-4, abs=1e-6), l


def test_removal_follows_the_scores_and_stops_at_the_target(folder):
    cfg = routed_model(folder).cfg
    scores = {(0, "attn"): 3.0, (0, "mlp"): 0.1, (1, "attn"): 0.2, (1, "mlp"): 5.0, (2, "attn"): 0.3, (2, "mlp"): 4.0}
    one = compute_ratio(cfg, 16, {(0, "mlp"): 0.0})
    assert prune.removal_set(cfg, scores, 16, one) == [(0, "mlp")]
    assert prune.removal_set(cfg, scores, 16, one - 1e-6) == [(0, "mlp"), (1, "attn")]
    assert prune.removal_set(cfg, scores, 16, 1.0) == []
    blocks = {(0, "block"): 2.0, (1, "block"): 1.0, (2, "block"): 3.0}
    assert prune.removal_set(cfg, blocks, 16, 0.99) == [(1, "attn"), (1, "mlp")]
    with pytest.raises(ValueError, match="does not reach"):
        prune.removal_set(cfg, scores, 16, 0.01)


def test_static_gates_skip_every_token_but_the_sinks(folder):
    model = routed_model(folder)
    prune.set_static(model, [(0, "mlp"), (2, "attn")])
    x = torch.randint(3, 64, (2, 10))
    _, records = model(x)
    keep = {(r.layer, r.kind): r.keep for r in records}
    for key, k in keep.items():
        if key in ((0, "mlp"), (2, "attn")):
            assert k[:, 0].all() and not k[:, 1:].any()                    # position 0 is the sink
        else:
            assert k.all()
    with gates.forced(model, {(0, "mlp"): 0.0, (2, "attn"): 0.0}):       # the same as keeping no token
        forced, _ = model(x)
    assert torch.allclose(model(x)[0], forced, atol=1e-6)


def test_a_pruned_run_trains_lora_only_and_its_ranking_is_reused(folder, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "kl"
    train.train(train.read_config(args(folder, corpus, out, prune="kl", prune_compute=0.9, max_iters=3)))
    record = json.loads((out / "prune.json").read_text())
    removed = [tuple(k) for k in record["removed"]]
    assert removed and record["compute_ratio"] <= 0.9
    model, _, _ = checkpoint.load_sparse(out)
    for layer, kind, r in router.routers(model):                          # the gates never moved
        assert float(r.proj.weight.abs().max()) == 0
        assert float(r.proj.bias) == (-prune.FIXED_LOGIT if (layer, kind) in removed else prune.FIXED_LOGIT)
    assert any(float(b.abs().max()) > 0 for n, b in model.named_parameters() if n.endswith(".B"))
    # a second run removes by the ranking it is given, not by one of its own: here the sublayer the
    # first run found most harmful is made the least
    worst = record["scores"][-1]
    assert (worst["layer"], worst["kind"]) not in removed
    given = dict(record, scores=[dict(worst, score=-1.0)] + record["scores"][:-1])
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / "prune.json").write_text(json.dumps(given))
    again = tmp_path / "again"
    train.train(train.read_config(args(folder, corpus, again, prune="kl", prune_scores=tmp_path / "given",
                                       prune_compute=0.9, max_iters=1)))
    reused = json.loads((again / "prune.json").read_text())
    assert reused["scores"] == given["scores"]
    assert reused["removed"][0] == [worst["layer"], worst["kind"]]


def test_a_hybrid_closes_the_removed_sublayers_and_routes_the_rest(folder, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "hybrid"
    train.train(train.read_config(args(folder, corpus, out, prune="layer", prune_compute=0.9, prune_routed=True,
                                       target_density="0.8,0.7", max_iters=4)))
    removed = {tuple(k) for k in json.loads((out / "prune.json").read_text())["removed"]}
    assert removed and all(kind in ("attn", "mlp") for _, kind in removed)
    model, _, meta = checkpoint.load_sparse(out)
    for layer, kind, r in router.routers(model):
        if (layer, kind) in removed:        # closed for good: sigmoid'(-30) ~ 1e-13 moves them by ~1e-9
            assert float(r.proj.weight.abs().max()) < 1e-6 and float(r.proj.bias) < -20
        else:                                                             # fitted, then trained
            assert float(r.proj.weight.abs().max()) > 0
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["target"] is not None for r in rows)                     # the controller holds a target
    assert checkpoint.load_sparse(out / "stage1")[2]["train_state"]["iter"] == 2
    assert method(meta["train_config"], "learned") == "static blocks (ShortGPT) + routed, rank-8 substitutes"
    assert prune.read_removed(out) == removed                              # what a resume keeps closed
    (out / "prune.json").unlink()
    with pytest.raises(ValueError, match="cannot read what this run removed .* start the run again"):
        train.train(train.read_config(args(folder, corpus, out, init="resume", prune="layer", prune_compute=0.9,
                                           prune_routed=True, target_density="0.8,0.7", max_iters=6)))


@pytest.mark.parametrize("over, message", [
    (dict(prune="random"), "not a ranking"),
    (dict(prune="kl", route="block"), "--route=sublayer"),
    (dict(prune="kl", target_density="0.9,0.8"), "no staged"),
    (dict(prune="kl", fsdp=True), "not tested under --fsdp"),
])
def test_bad_prune_flags_are_clear_errors(folder, corpus, tmp_path, over, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        train.read_config(args(folder, corpus, tmp_path / "x", **over))


def test_a_ranking_of_another_kind_is_refused(tmp_path):
    (tmp_path / "prune.json").write_text(json.dumps(dict(ranking="bi", scores=[])))
    with pytest.raises(ValueError, match="holds the 'bi' ranking"):
        prune.read_scores(str(tmp_path), "kl")
