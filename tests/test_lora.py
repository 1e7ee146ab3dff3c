"""Unit tests of lora.py: inject, the zero start, disabled(), merge, named_parameters, what trains, bfloat16.

    python -m pytest tests/test_lora.py -q

A tiny random model on the CPU, frozen the way load_weights.load_model freezes it.
"""
import pytest
import torch
import torch.nn as nn

import lora
from conftest import TINY
from model import Model, ModelConfig


def base_model(seed=0, dtype=torch.float32) -> Model:
    torch.manual_seed(seed)
    return Model(ModelConfig(**TINY)).to(dtype).eval().requires_grad_(False)   # as load_model returns it


def lora_model(targets=("wq", "wv", "down"), seed=0, dtype=torch.float32, rank=4, alpha=8.0) -> Model:
    """The base model with adapters whose B is random: the adapters then change the output."""
    model = lora.inject(base_model(seed, dtype), targets, rank, alpha)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora.adapters(model):
            m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.2)
    return model


def tokens(B=2, T=10):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(3))


def logits(model, **kw):
    with torch.no_grad():
        return model(tokens(), **kw)[0]


def projections(block):
    """name -> module of the seven projections of one block."""
    return {name: getattr(parent, name) for parent in (block.attn, block.mlp) for name in lora.TARGETS
            if hasattr(parent, name)}


@pytest.mark.parametrize("targets", [("wq", "wv"), ("wk", "wo", "gate", "up", "down"), lora.TARGETS])
def test_inject_wraps_exactly_the_named_projections(targets):
    model = base_model()
    before = [projections(block) for block in model.layers]
    lora.inject(model, targets, rank=4, alpha=8.0)
    assert len(lora.adapters(model)) == len(targets) * model.cfg.n_layers
    for block, old in zip(model.layers, before):
        mods = projections(block)
        assert set(mods) == set(lora.TARGETS)
        for name, mod in mods.items():
            if name in targets:
                assert isinstance(mod, lora.LoRALinear) and mod.base is old[name]   # the same frozen weights
                assert mod.A.shape == (4, old[name].in_features)
                assert mod.B.shape == (old[name].out_features, 4)
                assert mod.scale == 2.0
            else:
                assert mod is old[name] and type(mod) is nn.Linear


def test_inject_rejects_unknown_targets_and_bad_rank():
    model = base_model()
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['q_proj'\]: choose from wq, wk"):
        lora.inject(model, ("wq", "q_proj"))
    assert lora.adapters(model) == []                    # nothing half-injected
    with pytest.raises(ValueError, match="rank must be positive"):
        lora.inject(model, ("wq",), rank=0)


@pytest.mark.parametrize("masked", [False, True])
def test_at_init_the_model_is_the_base_model(masked):
    expected = logits(base_model())
    model = lora.inject(base_model(), ("wq", "wk", "wv", "wo", "gate", "up", "down"), rank=4)
    assert all(m.B.abs().max() == 0 and m.A.abs().max() > 0 for m in lora.adapters(model))
    assert torch.equal(logits(model, masked=masked), expected)


def test_disabled_gives_the_base_model_and_restores_the_adapters():
    expected = logits(base_model())
    model = lora_model()
    adapted = logits(model)
    assert (adapted - expected).abs().max() > 1e-2       # the adapters do change the output
    mods = lora.adapters(model)
    with lora.disabled(model):
        assert not any(m.enabled for m in mods)
        assert torch.equal(logits(model), expected)
    assert all(m.enabled for m in mods)
    assert torch.equal(logits(model), adapted)
    # restored after an exception too, and to what each adapter was (not blindly to "on")
    mods[0].enabled = False
    with pytest.raises(RuntimeError, match="boom"):
        with lora.disabled(model):
            raise RuntimeError("boom")
    assert [m.enabled for m in mods] == [False] + [True] * (len(mods) - 1)


def test_merge_equals_unmerged_and_counts_the_update_once():
    base = logits(base_model())
    model = lora_model(("wq", "wk", "wv", "wo", "gate", "up", "down"))
    unmerged = logits(model)
    mods = lora.adapters(model)
    expected_weights = [(m.base.weight + m.scale * m.B @ m.A).detach().clone() for m in mods]
    lora.merge(model)
    for m, w in zip(mods, expected_weights):
        assert m.merged and m.enabled                    # still "enabled": forward must not add B A again
        torch.testing.assert_close(m.base.weight, w)
    merged = logits(model)
    assert (unmerged - base).abs().max() > 1e-2          # a double-counted update would show
    torch.testing.assert_close(merged, unmerged)
    lora.merge(model)                                    # merging twice changes nothing
    assert torch.equal(logits(model), merged)


def test_named_parameters_are_only_the_adapter_tensors():
    import router
    model = router.add_routers(lora_model(("wq", "down")), "sublayer", "all")
    state = {n: p.detach() for n, p in lora.named_parameters(model).items()}
    expected = {f"layers.{i}.{path}.{ab}" for i in range(2) for path in ("attn.wq", "mlp.down") for ab in "AB"}
    assert set(state) == expected
    params = dict(model.named_parameters())
    for name, t in state.items():
        assert torch.equal(t, params[name])
    # the state alone turns a fresh injected base into the trained model
    fresh = lora.inject(base_model(), ("wq", "down"), rank=4, alpha=8.0)
    result = fresh.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    torch.testing.assert_close(logits(fresh), logits(model))   # model: the same with open routers


def test_gradient_reaches_only_a_and_b():
    model = lora_model(("wq", "wv", "up"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{path}.{ab}" for i in range(2)
                         for path in ("attn.wq", "attn.wv", "mlp.up") for ab in "AB"}
    out, _ = model(tokens())
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


def test_bfloat16_base_with_float32_adapters():
    expected = logits(base_model(dtype=torch.bfloat16))
    model = lora.inject(base_model(dtype=torch.bfloat16), ("wq", "wv", "down"), rank=4, alpha=8.0)
    for m in lora.adapters(model):
        assert m.A.dtype == m.B.dtype == torch.float32 and m.base.weight.dtype == torch.bfloat16
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)   # B = 0: still the base model

    model = lora_model(("wq", "wv", "down"), dtype=torch.bfloat16)
    adapted, _ = model(tokens())
    assert adapted.dtype == torch.bfloat16
    assert (adapted.float() - expected.float()).abs().max() > 1e-1
    with lora.disabled(model):
        assert torch.equal(logits(model), expected)
    adapted.float().square().mean().backward()
    for m in lora.adapters(model):
        assert m.A.grad.dtype == m.B.grad.dtype == torch.float32 and m.A.grad.abs().max() > 0
    # the adapters move the logits as much as on a float32 base, up to bf16 rounding: logits reach
    # ~40 here (ulp 0.25), the adapters move them by ~6
    change = adapted.detach().float() - expected.float()
    change_f32 = logits(lora_model(("wq", "wv", "down"))) - logits(base_model())
    torch.testing.assert_close(change, change_f32, rtol=0, atol=0.3)
