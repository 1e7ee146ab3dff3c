"""Unit tests of the routing method (router.py and the routed paths of model.py).

    python -m pytest tests/test_router.py -q

Tiny random models on the CPU in float32. What is checked:
- open routers (weight 0, bias +3) leave the dense model untouched, in both paths and kv modes,
  and each route granularity gates exactly the sublayers it names;
- the gate is hard in the forward pass and the router gets the straight-through gradient
  sigmoid'(z) * <dL/dh, f(x)>, checked against a hand computation;
- kv="kept" equals attention over the sequence with the skipped tokens deleted by hand;
- the L1 loss and the gate statistics against hand-made numbers.
"""
import math

import pytest
import torch

import gates
import router
from conftest import TINY as LLAMA
from model import Model, ModelConfig
# Every Gemma trap at once: (1 + w) norms, embedding scale, GeGLU, sandwich and q/k norms,
# attention and final soft-capping, a sliding layer with its own rope base.
GEMMA = dict(LLAMA, norm_eps=1e-6, norm_offset=True, act="gelu_tanh", embed_scale=True, sandwich_norm=True,
             qk_norm=True, query_scale=8.0, attn_softcap=2.0, final_softcap=5.0, sliding_window=4,
             layer_types=("sliding", "full"), rope_theta=1e6, rope_local_theta=1e4)
FAMILIES = {"llama": LLAMA, "gemma": GEMMA}
# which sublayers own a router, per route ("block": one router before attention gates both)
OWNS_ROUTER = {"sublayer": {"attn", "mlp"}, "attn": {"attn"}, "mlp": {"mlp"}, "block": {"attn"}}
GATED = {"sublayer": {"attn", "mlp"}, "attn": {"attn"}, "mlp": {"mlp"}, "block": {"attn", "mlp"}}


def tiny_model(family="llama", seed=0, **overrides) -> Model:
    """A random model whose norm weights are random too, so that no norm is the identity."""
    torch.manual_seed(seed)
    model = Model(ModelConfig(**dict(FAMILIES[family], **overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if model.cfg.norm_offset else p.uniform_(0.5, 1.5)
    return model.eval()


def random_routers(model, seed=1, scale=1.0):
    """Give every router random weights and bias 0: about half the tokens skip each sublayer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, r in router.routers(model):
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g) * scale)
            r.proj.bias.zero_()


def tokens(B=2, T=12, seed=2, vocab=64):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def capture(module, pre=False):
    """Record the input (pre=True) or the output of a module's next forward calls in a list."""
    seen = []
    if pre:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        module.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


# ----------------------------------------------------------------------------------------------
# Open routers are the dense model; each route gates what it names
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("route", router.ROUTES)
@pytest.mark.parametrize("family", FAMILIES)
def test_open_routers_give_the_dense_model(family, route, kv):
    model = tiny_model(family)
    idx = tokens()
    with torch.no_grad():
        dense, records = model(idx)
        assert records == []
        router.add_routers(model, route, kv)
        assert (model.cfg.route, model.cfg.kv) == (route, kv)
        for _, _, r in router.routers(model):
            assert r.proj.weight.abs().max() == 0 and torch.all(r.proj.bias == 3.0)
        masked, _ = model(idx, masked=True)
        compact, _ = model(idx)
        cache = model.new_cache(2, 12)                    # prefill 8 tokens, then decode one by one
        steps = [model(idx[:, :8], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(masked, dense)
    torch.testing.assert_close(compact, dense)
    torch.testing.assert_close(torch.cat(steps, 1), dense)


@pytest.mark.parametrize("route", router.ROUTES)
def test_routes_attach_routers_where_they_should(route):
    model = router.add_routers(tiny_model(), route, "all")
    owned = {(layer, kind) for layer, kind, _ in router.routers(model)}
    assert owned == {(layer, kind) for layer in range(2) for kind in OWNS_ROUTER[route]}
    random_routers(model)
    _, records = model(tokens(), masked=True)
    assert {(r.layer, r.kind) for r in records} == {(layer, kind) for layer in range(2) for kind in GATED[route]}
    if route == "block":  # the mlp obeys the attention router's decision
        by_key = {(r.layer, r.kind): r for r in records}
        for layer in range(2):
            assert by_key[(layer, "mlp")].z is by_key[(layer, "attn")].z


def zero_after_first_token(module):
    """Make module's output 0 at every position but 0 (the attention sink), via a forward hook."""
    def hook(m, args, out):
        out = out.clone()
        out[:, 1:] = 0
        return out
    module.register_forward_hook(hook)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "compact"])
@pytest.mark.parametrize("route", router.ROUTES)
def test_closed_routers_remove_exactly_the_routed_sublayers(route, masked):
    """Every router shut: the model equals the dense model with the gated sublayers' outputs
    zeroed for every token but the sink at position 0, which always computes."""
    model = tiny_model("gemma")
    reference = tiny_model("gemma")
    for block in reference.layers:
        if "attn" in GATED[route]:
            zero_after_first_token(block.attn.wo)
        if "mlp" in GATED[route]:
            zero_after_first_token(block.mlp.down)
    router.add_routers(model, route, "all", bias_init=-3.0)
    idx = tokens()
    with torch.no_grad():
        expected, _ = reference(idx)
        logits, records = model(idx, masked=masked)
    assert all(r.keep[:, 0].all() and not r.keep[:, 1:].any() for r in records)
    torch.testing.assert_close(logits, expected)


def test_sinks_compute_under_every_gate_mode_and_only_sinks_get_no_gradient():
    """Position 0 and every BOS token compute whatever the router says — learned, random at
    density 0, in prefill and in decoding — and their router logits carry no gradient."""
    model = tiny_model(bos_id=5)
    router.add_routers(model, "sublayer", "all", bias_init=-3.0)
    idx = tokens(T=10)
    idx[0, 4] = 5                                                        # a BOS in the middle
    idx[1] = torch.where(idx[1] == 5, 6, idx[1])                         # and none in row 1
    sink = torch.zeros_like(idx, dtype=torch.bool)
    sink[:, 0], sink[0, 4] = True, True
    for table in ({}, 0.0):
        with gates.forced(model, table), torch.no_grad():
            _, records = model(idx)
        assert all(torch.equal(r.keep, sink) for r in records)
    for B in (2, 1):                                     # decoding token by token (batch 1: compact.step)
        cache = model.new_cache(B, 12)
        with torch.no_grad():
            for t in range(idx.shape[1]):
                _, records = model(idx[:B, t:t + 1], cache=cache)
                assert all(torch.equal(r.keep, sink[:B, t:t + 1]) for r in records)
    seen = []
    router.routers(model)[0][2].register_forward_hook(lambda m, args, z: seen.append(z))
    _, records = model(idx, masked=True)
    z, = seen                                                            # the router's own logits (B, T)
    z.retain_grad()
    router.l1_loss(records).backward()
    assert (z.grad[sink] == 0).all() and (z.grad[~sink] != 0).all()     # the other tokens still learn
    assert router.sink_tokens(idx[:, 1:], 1, model.cfg)[0, 3]            # BOS away from position 0
    assert router.sink_tokens(idx[1:, 1:], 1, model.cfg) is None         # nothing to protect


def test_sink_logit_has_no_gradient():
    z = torch.tensor([router.SINK_LOGIT, 0.0], requires_grad=True)
    router.hard_gate(z).sum().backward()
    assert z.grad[0] < 1e-12 and z.grad[1] == 0.25


# ----------------------------------------------------------------------------------------------
# Hard gate forward, straight-through gradient backward
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["attn", "mlp"])
def test_gate_is_hard_and_router_gets_straight_through_gradient(kind):
    """One sublayer h_out = h_in + g * f(x), g = 1[z > 0]: check h_out and dL/dz, dL/dw, dL/db by hand."""
    model = router.add_routers(tiny_model(), "sublayer", "all")
    block = model.layers[0]
    r = getattr(block, f"{kind}_router")
    with torch.no_grad():
        r.proj.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        r.proj.bias.zero_()
    # h_in enters the sublayer's norm; f(x) leaves attn.wo / mlp; h_out enters the next norm
    h_in = capture(block.attn_norm if kind == "attn" else block.mlp_norm, pre=True)
    f_x = capture(block.attn.wo if kind == "attn" else block.mlp)
    h_out = capture(block.mlp_norm if kind == "attn" else model.layers[1].attn_norm, pre=True)
    x_z = []
    r.register_forward_hook(lambda m, args, z: x_z.append((args[0], z)))

    logits, _ = model(tokens(), masked=True)
    (x, z), = x_z
    z.retain_grad()
    h_out[0].retain_grad()
    loss = (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))).sum()
    loss.backward()

    keep = z > 0
    keep[:, 0] = True                                                  # the sink computes whatever z says
    assert keep.any() and (~keep).any(), "the test needs kept and skipped tokens"
    # forward: the sublayer output is added exactly once or not at all
    h_in, f, out = h_in[0].detach(), f_x[0].detach(), h_out[0].detach()
    assert torch.equal(out[~keep], h_in[~keep])
    assert torch.equal(out[keep], h_in[keep] + f[keep])
    # backward: dL/dz = sigmoid'(z) * <dL/dh_out, f(x)> per token, then the chain rule through z = w.x + b
    s = torch.sigmoid(z.detach())
    dz = s * (1 - s) * (h_out[0].grad * f).sum(-1)                      # (B, T)
    dz[:, 0] = 0                                                       # the sink's logit is pinned
    for token in (keep[:, 1:].nonzero()[0] + torch.tensor([0, 1]), (~keep).nonzero()[0]):   # one kept, one skipped
        b, t = token.tolist()
        assert dz[b, t].abs() > 1e-6
        torch.testing.assert_close(z.grad[b, t], dz[b, t])
    torch.testing.assert_close(z.grad, dz)
    torch.testing.assert_close(r.proj.weight.grad, (dz[..., None] * x.detach()).sum((0, 1))[None])
    torch.testing.assert_close(r.proj.bias.grad, dz.sum()[None])


def test_hard_gate_values_are_exactly_zero_or_one():
    z = torch.linspace(-6, 6, 10001, requires_grad=True)
    g = router.hard_gate(z)
    assert torch.equal(g, (z > 0).float())
    g.sum().backward()
    s = torch.sigmoid(z.detach())
    torch.testing.assert_close(z.grad, s * (1 - s))


# ----------------------------------------------------------------------------------------------
# kv="kept": skipped tokens are absent from the attention
# ----------------------------------------------------------------------------------------------

def attention_without(x, keep, attn, theta):
    """Reference: causal attention over the kept rows of x (T, d) only, at their original positions.

    Written from the weights, independent of model.py's attention code. Returns (n_kept, d).
    """
    H, Hkv, D = attn.H, attn.Hkv, attn.D
    pos = keep.nonzero().squeeze(1).float()                             # (n,) original positions
    xk = x[keep]                                                        # (n, d)
    q = (xk @ attn.wq.weight.t()).view(-1, H, D)
    k = (xk @ attn.wk.weight.t()).view(-1, Hkv, D)
    v = (xk @ attn.wv.weight.t()).view(-1, Hkv, D)
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    angle = torch.cat([pos[:, None] * inv_freq] * 2, -1)[:, None]       # (n, 1, D)

    def rotate(t):  # rotate-half rotary embedding
        t1, t2 = t[..., :D // 2], t[..., D // 2:]
        return t * angle.cos() + torch.cat([-t2, t1], -1) * angle.sin()

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)   # (n, H, D)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    causal = pos[None, :] <= pos[:, None]                              # (n, n) key before query
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    y = torch.einsum("hqk,khd->qhd", probs, v).reshape(len(pos), H * D)
    return y @ attn.wo.weight.t()


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "compact"])
def test_kv_kept_equals_attention_with_skipped_tokens_deleted(masked):
    model = router.add_routers(tiny_model(n_layers=1), "attn", "kept")
    random_routers(model, seed=5)
    block = model.layers[0]
    h_in, x_in, h_mid = capture(block.attn_norm, pre=True), capture(block.attn_norm), capture(block.mlp_norm, pre=True)
    with torch.no_grad():
        _, records = model(tokens(T=16), masked=masked)
    keep = records[0].keep                                              # (B, T)
    for b in range(keep.shape[0]):
        first_kept = int(keep[b].nonzero()[0])
        assert (~keep[b, first_kept:]).any(), "the test needs a skipped token before a kept one"
        expected = h_in[0][b, keep[b]] + attention_without(x_in[0][b], keep[b], block.attn, model.cfg.rope_theta)
        torch.testing.assert_close(h_mid[0][b, keep[b]], expected)
        assert torch.equal(h_mid[0][b, ~keep[b]], h_in[0][b, ~keep[b]])


def test_kv_kept_skipped_tokens_reach_no_kept_token():
    """d(logits of kept tokens) / d(embeddings of skipped tokens) is exactly 0 in the masked path."""
    model = router.add_routers(tiny_model(n_layers=1), "attn", "kept")
    random_routers(model, seed=5)
    emb = capture(model.tok_emb)
    logits, records = model(tokens(T=16), masked=True)
    emb[0].retain_grad()
    keep = records[0].keep
    logits[keep].sum().backward()
    assert emb[0].grad[keep].abs().max() > 0
    assert torch.equal(emb[0].grad[~keep], torch.zeros_like(emb[0].grad[~keep]))
    # the same model with kv="all" does let them through: the check above can fail
    model.cfg.kv = "all"
    logits, _ = model(tokens(T=16), masked=True)
    emb[1].retain_grad()
    logits[keep].sum().backward()
    assert emb[1].grad[~keep].abs().max() > 0


@pytest.mark.parametrize("kv", router.KV_MODES)
@pytest.mark.parametrize("route", router.ROUTES)
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_and_compacted_paths_agree_with_random_gates(family, route, kv):
    model = router.add_routers(tiny_model(family), route, kv)
    random_routers(model, seed=6)
    idx = tokens(T=16)
    with torch.no_grad():
        masked, rec_masked = model(idx, masked=True)
        compact, rec_compact = model(idx)
    density = torch.stack([r.keep.float().mean() for r in rec_masked]).mean()
    assert 0.2 < density < 0.8
    assert [(r.layer, r.kind) for r in rec_masked] == [(r.layer, r.kind) for r in rec_compact]
    for a, b in zip(rec_masked, rec_compact):
        assert torch.equal(a.keep, b.keep)
    torch.testing.assert_close(compact, masked)


# ----------------------------------------------------------------------------------------------
# L1 loss, gate statistics, argument checks
# ----------------------------------------------------------------------------------------------

def record(layer, kind, z):
    z = torch.tensor(z, dtype=torch.float32)
    return router.GateRecord(layer, kind, z, z > 0)


def test_l1_loss_by_hand():
    L3 = math.log(3.0)   # sigmoid(log 3) = 3/4, sigmoid(-log 3) = 1/4
    records = [record(0, "attn", [[0.0, 0.0], [L3, -L3]]),      # mean sigmoid 1/2
               record(0, "mlp", [[L3, L3], [L3, L3]]),          # 3/4
               record(1, "attn", [[-L3, -L3], [-L3, -L3]]),     # 1/4
               record(1, "mlp", [[L3, 0.0], [-L3, L3]])]        # 9/16
    torch.testing.assert_close(router.l1_loss(records), torch.tensor((1 / 2 + 3 / 4 + 1 / 4 + 9 / 16) / 4))
    wa, wm = 0.2, 0.8
    weighted = (wa * (1 / 2 + 1 / 4) + wm * (3 / 4 + 9 / 16)) / (2 * wa + 2 * wm)
    torch.testing.assert_close(router.l1_loss(records, {"attn": wa, "mlp": wm}), torch.tensor(weighted))


def test_l1_loss_of_a_forward_pass_and_its_gradient():
    model = router.add_routers(tiny_model(), "sublayer", "all")
    random_routers(model, seed=7)
    _, records = model(tokens(), masked=True)
    assert len(records) == 4
    expected = torch.stack([torch.sigmoid(r.z) for r in records]).mean()   # same T for all
    loss = router.l1_loss(records)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for _, _, r in router.routers(model):
        assert r.proj.bias.grad.item() > 0     # pushing every logit down lowers the loss


def test_gate_stats_match_counts():
    records = [record(0, "attn", [[1, -1, 1, 1], [-1, -1, 1, -1]]),   # 4 of 8 kept
               record(0, "mlp", [[1, 1, 1, 1], [1, 1, 1, 1]]),       # 8 of 8
               record(1, "attn", [[-1, -1, 1, -1], [-1, 1, -1, -1]]), # 2 of 8
               record(1, "mlp", [[1, 1, -1, 1], [1, -1, 1, 1]])]      # 6 of 8
    stats = router.GateStats(records)
    assert stats.density() == {(0, "attn"): 4 / 8, (0, "mlp"): 1.0, (1, "attn"): 2 / 8, (1, "mlp"): 6 / 8}
    assert stats.mean("attn") == pytest.approx((4 + 2) / 16)
    assert stats.mean("mlp") == pytest.approx((8 + 6) / 16)


def test_gate_stats_of_a_forward_pass():
    model = router.add_routers(tiny_model(), "attn", "all")
    random_routers(model, seed=8)
    _, records = model(tokens())
    stats = router.GateStats(records)
    kept = sum(int((r.z > 0).sum()) for r in records)
    assert stats.mean("attn") == pytest.approx(kept / (2 * 2 * 12))
    assert stats.mean("mlp") == 1.0                 # not routed: always computed


@pytest.mark.parametrize("route, kv, message", [("layer", "all", "unknown route 'layer'"),
                                                ("sublayer", "some", "unknown kv mode 'some'")])
def test_add_routers_rejects_unknown_modes(route, kv, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message) as err:
        router.add_routers(model, route, kv)
    assert "choose one of" in str(err.value)
    assert model.cfg.route == "none" and router.routers(model) == []   # nothing half-done
