"""Unit tests of the training-free baselines' gates (gates.py), forced onto a model from outside.

    python -m pytest tests/test_gates.py -q

Random gates are covered with the compaction tests (tests/test_compaction.py); here: the peek
rule against a hand computation, its table, and that forcing leaves the model as it was.
"""
import math

import pytest
import torch

import gates
import router
from test_router import capture, tiny_model, tokens


def test_peek_gates_follow_the_rule_by_hand():
    """Peek: a token computes a sublayer iff log(|f(x)| / |h|) > the sublayer's threshold, with
    f(x) and h taken from the dense pass where every earlier sublayer computed the same way; the
    block's stream after the MLP is h + keep * f(x), on both paths."""
    model = tiny_model()
    router.add_routers(model, "mlp", "all")
    idx = tokens()
    block = model.layers[0]
    seen = capture(block.mlp)
    inputs = capture(block.mlp_norm, pre=True)
    outputs = capture(model.layers[1].attn_norm, pre=True)               # the stream after layer 0's MLP
    with torch.no_grad():
        model(idx, routers_off=True)                                     # the dense pass: f(x) and h
    log_ratio = (seen[0].norm(dim=-1) / inputs[0].norm(dim=-1)).log()    # (B, T) log(|f(x)| / |h|)
    threshold = float(log_ratio[:, 1:].median())                         # half of the tokens keep
    with gates.forced(model, {(0, "mlp"): ("peek", threshold), (1, "mlp"): "open"}), torch.no_grad():
        _, records = model(idx, masked=True)
    expected = log_ratio > threshold
    expected[:, 0] = True                                                # the sink
    assert 0 < expected[:, 1:].float().mean() < 1                        # the rule has work to do
    assert torch.equal(records[0].keep, expected)
    f_x, h_in = seen[0], inputs[0]                                       # the dense pass's; layer 0 is before the rule
    by_hand = h_in + expected[..., None] * f_x                           # a skipped token adds 0
    torch.testing.assert_close(outputs[1], by_hand)
    with gates.forced(model, {(0, "mlp"): ("peek", threshold), (1, "mlp"): "open"}), torch.no_grad():
        compacted, compacted_records = model(idx)                        # every sublayer runs: same gates
        masked, _ = model(idx, masked=True)
    assert torch.equal(compacted_records[0].keep, expected)
    torch.testing.assert_close(outputs[2], by_hand)
    torch.testing.assert_close(compacted, masked)


def test_peek_gates_table_spends_one_threshold_per_flop():
    model = tiny_model()
    router.add_routers(model)
    table = gates.peek_gates(model, -2.0, {"attn": math.e, "mlp": math.e ** 3})
    assert table[(0, "attn")] == ("peek", pytest.approx(-1.0)) and table[(1, "mlp")] == ("peek", pytest.approx(1.0))
    with pytest.raises(ValueError, match="peek"):
        with gates.forced(model, ("peek", "high")):
            pass


def test_forced_gates_are_restored_even_on_error():
    model = router.add_routers(tiny_model(), "sublayer", "all")
    with pytest.raises(KeyError, match="inside the block"):
        with gates.forced(model, {(0, "attn"): 0.0, (1, "mlp"): ("peek", 0.0)}):
            swapped = [(type(b.attn_router).__name__, type(b.mlp_router).__name__) for b in model.layers]
            assert swapped == [("RandomGate", "Router"), ("Router", "NoneType")]
            raise KeyError("inside the block")
    assert [(l, k, type(r).__name__) for l, k, r in router.routers(model)] == [
        (0, "attn", "Router"), (0, "mlp", "Router"), (1, "attn", "Router"), (1, "mlp", "Router")]
    no_hooks = lambda m: not (m._forward_hooks or m._forward_pre_hooks)          # noqa: E731
    assert all(no_hooks(m) for m in model.modules())                    # the peek rule's hooks are gone
    with pytest.raises(ValueError, match="cannot force gates to 'peek'"):
        with gates.forced(model, "peek"):
            pass
    assert all(type(r).__name__ == "Router" for _, _, r in router.routers(model))   # nothing half-done


def test_peek_gates_of_a_block_route_gate_both_sublayers_with_one_decision():
    """route="block": the peek rule decides on the attention's output, and the MLP follows."""
    model = tiny_model()
    router.add_routers(model, "block", "all")
    idx = tokens()
    with gates.forced(model, ("peek", -1.0)), torch.no_grad():
        _, records = model(idx, masked=True)
    assert [(r.layer, r.kind) for r in records] == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    assert all(torch.equal(a.keep, m.keep) for a, m in zip(records[::2], records[1::2]))
    assert 0 < float(torch.cat([r.keep[:, 1:] for r in records]).float().mean()) < 1


def test_peek_gates_decode_with_a_cache_as_they_recompute():
    """The peek rule decides per token from its own pass, so cached decoding makes the decisions
    and the logits of recomputing the whole sequence."""
    model = tiny_model()
    router.add_routers(model, "sublayer", "all")
    idx = tokens(B=1, T=10)
    with gates.forced(model, ("peek", -1.5)), torch.no_grad():
        full, full_records = model(idx, masked=True)
        cache = model.new_cache(1, 10)
        steps = [model(idx[:, t:t + 1], cache=cache) for t in range(10)]
    assert 0 < float(torch.cat([r.keep[:, 1:] for r in full_records]).float().mean()) < 1   # keeps and skips
    for t, (logits, records) in enumerate(steps):
        torch.testing.assert_close(logits[:, -1], full[:, t])
        assert len(records) == len(full_records) > 0
        assert all(torch.equal(r.keep, f.keep[:, t:t + 1]) for r, f in zip(records, full_records))
