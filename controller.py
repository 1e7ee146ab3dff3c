"""controller.py — how much each router keeps: a start fitted before training, then one common bias shift per step.

    fit_substitutes(model, batches)               # what a skip adds: least squares to f(x)
    fit_routers(model, batches, savings)          # ridge fit to the training-free peek rule
    set_density(model, batches, weights, 0.87)    # the one common threshold that gives the density
    ctrl = DensityController(targets, stage_iters, anneal, gain)
    ctrl.update(model, it, records, weights)      # after every step: back to the target

train.py's density is the FLOP-weighted fraction of routed work computed (router.GateStats.mean
with weights = the FLOPs a skip saves, flops.skip_savings). The KL decides which tokens and
sublayers keep their compute; these functions decide only how much is kept in total.
"""
import math

import torch

import lora
import router
from distributed import gathered, held_as, whole


@torch.no_grad()
def sublayer_io(model, x: torch.Tensor, keys=None) -> dict:
    """{(layer, kind): (h, x_norm, y)} of every routed sublayer (or of keys) with routers off, on
    tokens x (B, T): the residual stream h before the sublayer, its normalized input x_norm
    (what its router sees) and its output y, so that h + y is the stream after it. Each is
    (B, T, d). Wrap the call in lora.disabled(model) for the base model's."""
    seen, hooks = {}, []
    for layer, kind in keys if keys is not None else [(l, k) for l, k, _ in router.routers(model)]:
        block, key = model.layers[layer], (layer, kind)
        norm, post = (block.attn_norm, block.attn_post_norm) if kind == "attn" else (block.mlp_norm, block.mlp_post_norm)
        hooks.append(norm.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(key, [args[0], out])))
        hooks.append(post.register_forward_hook(lambda m, args, out, key=key: seen[key].append(out)))
    try:
        model(x, routers_off=True, return_hidden=True)
    finally:
        for hook in hooks:
            hook.remove()
    return {key: tuple(v) for key, v in seen.items()}


def sublayers(model, batches):
    """{(layer, kind): (h, x, y)} per batch: sublayer_io of the base model (LoRA off) for every
    gated sublayer, each (N, d) in float32 without position 0 (a sink)."""
    keys = [(l, k) for l, k, _ in router.routers(model)] + [(l, k) for l, k, _ in router.substitutes(model)]
    for x in batches:
        with lora.disabled(model):
            found = sublayer_io(model, x, sorted(set(keys)))
        yield {key: tuple(t[:, 1:].flatten(0, 1).float() for t in io) for key, io in found.items()}


@torch.no_grad()
def fit_substitutes(model, batches, ridge: float = 1e-2):
    """Fit every skip substitute s(x) = b + (x A) B (router.Substitute) to its sublayer's output
    f(x) on the dense model, by least squares (reduced_rank); rank 0 is the mean output alone."""
    subs = {(l, k): s for l, k, s in router.substitutes(model)}
    if not subs:                                                        # a skip adds 0: no pass to run
        return
    n, sx, sy, sxx, sxy = {}, {}, {}, {}, {}
    for found in sublayers(model, batches):
        for key in subs:
            _, x, y = (t.double() for t in found[key])
            for acc, v in ((n, len(x)), (sx, x.sum(0)), (sy, y.sum(0)), (sxx, x.T @ x), (sxy, x.T @ y)):
                acc[key] = acc.get(key, 0) + v
    for key, s in subs.items():
        mx, my = sx[key] / n[key], sy[key] / n[key]                        # (d,)
        if s.down is None:
            s.bias.copy_(held_as(s.bias, my.float()))
            continue
        cxx = sxx[key] / n[key] - torch.outer(mx, mx)                      # (d, d) covariances
        cxy = sxy[key] / n[key] - torch.outer(mx, my)
        a, b, bias = reduced_rank(mx, my, cxx, cxy, s.down.shape[1], ridge)
        s.down.copy_(held_as(s.down, a.float()))
        s.up.copy_(held_as(s.up, b.float()))
        s.bias.copy_(held_as(s.bias, bias.float()))


def reduced_rank(mx, my, cxx, cxy, rank: int, ridge: float = 1e-2):
    """The least-squares map y ~ bias + (x A) B of rank r, from the means mx (d,), my (m,) and
    covariances cxx (d, d), cxy (d, m): the ridge solution W of the centred y on x, reduced to
    the r directions in which x W varies most (reduced-rank regression); bias makes the mean
    right. -> A (d, r), B (r, m), bias (m,)."""
    eye = torch.eye(len(cxx), dtype=cxx.dtype, device=cxx.device)
    w = torch.linalg.solve(cxx + ridge * cxx.diagonal().mean() * eye, cxy)   # (d, m)
    _, vectors = torch.linalg.eigh(w.T @ cxx @ w)                           # the fit's covariance, ascending
    v = vectors[:, -rank:] if rank else vectors[:, :0]                      # (m, r) its top directions
    a, b = w @ v, v.T
    return a, b, my - mx @ a @ b


def skip_output(skip, x: torch.Tensor) -> torch.Tensor:
    """s(x) of a router.Substitute from its whole parameters: under train.py --fsdp they are
    shards outside their block's forward (every process calls this, in the same order)."""
    bias = whole(skip.bias)
    return bias.expand_as(x) if skip.down is None else x @ whole(skip.down) @ whole(skip.up) + bias


def fit_routers(model, batches, savings: dict, ridge: float = 1e-2):
    """Fit every router, by ridge regression on the dense model, to predict what a skip of its
    sublayer would lose, log(|f(x) - s(x)| / |h|) (s the substitute, or 0), from its input x,
    minus the log of the FLOPs a skip there saves.

    A router then opens where the training-free peek rule (evaluate.py --gates=peek) would compute:
    one threshold on "how much the token's stream moves per FLOP" across all sublayers, which also
    decides how much each sublayer skips. Fitted in seconds from forward passes alone (the normal
    equations, (d + 1)^2 numbers per router), it starts training from a reasonable allocation
    instead of every gate open. set_density then picks the common threshold.
    """
    gram, moment = {}, {}
    for found in sublayers(model, batches):
        for layer, kind, _ in router.routers(model):
            h, inputs, y = found[(layer, kind)]                                # (N, d) each
            skip = getattr(model.layers[layer], f"{kind}_skip")
            with torch.no_grad():
                target = router.log_move(h, y if skip is None else y - skip_output(skip, inputs))   # (N,)
            xa = torch.cat([inputs, torch.ones(len(inputs), 1, device=inputs.device)], 1).double()   # (N, d + 1)
            key = (layer, kind)
            gram[key] = gram.get(key, 0) + xa.T @ xa
            moment[key] = moment.get(key, 0) + xa.T @ target.double()
    with torch.no_grad():
        for layer, kind, r in router.routers(model):
            w = ridge_solve(gram[(layer, kind)], moment[(layer, kind)], ridge)   # (d + 1,)
            r.proj.weight.copy_(held_as(r.proj.weight, w[:-1][None]))
            r.proj.bias.fill_(float(w[-1]) - math.log(savings[kind]))


def ridge_solve(gram: torch.Tensor, moment: torch.Tensor, ridge: float) -> torch.Tensor:
    """w of the ridge regression whose normal equations are gram w = moment, gram (d + 1, d + 1) of
    inputs whose last column is 1: the intercept, which is not shrunk. The penalty scales with the
    inputs' mean square, so `ridge` means the same at any width."""
    penalty = ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    penalty[-1, -1] = 0
    return torch.linalg.solve(gram + penalty, moment)


def shift_routers(model, step: float, fixed=()):
    """Move every router's threshold by one common step (positive: fewer tokens compute), but
    those of the fixed sublayers."""
    with torch.no_grad():
        for layer, kind, r in router.routers(model):
            if (layer, kind) not in fixed:
                r.proj.bias -= step


@torch.no_grad()
def set_density(model, batches, weights: dict, target: float, tol: float = 2e-3, fixed=()):
    """Shift all routers (but the fixed sublayers') by the one amount that makes their
    FLOP-weighted density on batches `target` (bisection: density falls as the shift grows)."""
    def density():
        stats = router.GateStats()
        for x in batches:
            stats.add(model(x, return_hidden=True)[1])
        return stats.mean(weights=weights)

    lo, hi, moved = -50.0, 50.0, 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        shift_routers(model, mid - moved, fixed)
        moved = mid
        d = density()
        if abs(d - target) <= tol:
            break
        lo, hi = (mid, hi) if d > target else (lo, mid)
    return d


class DensityController:
    """Holds the measured FLOP-weighted density at a target by shifting every router's bias by one
    common amount after each step: bias -= gain * s, where s is the shift that would have put this
    step's batch exactly at the target (balancing_shift); gain in [0, 1] damps batch noise.

    A shift of the biases moves the density at once (in the same step), where a loss weight on an
    L1 term moves it only after many Adam steps, so it lags and then overshoots; solving for the
    shift, rather than stepping by gain * (density - target), stays stable however steeply the
    density responds. The KL alone then decides which tokens and sublayers keep their compute:
    a router whose sublayer matters more to the KL rises against the common shift. In a later
    stage the target slides from the previous one over the stage's first --anneal fraction.
    """

    def __init__(self, targets, stage_iters: int, anneal: float, gain: float):
        self.targets, self.stage_iters, self.gain = list(targets), max(1, stage_iters), gain
        self.anneal_iters = max(1, int(anneal * self.stage_iters))
        self.fixed = set()      # (layer, kind) a hybrid closed for good: counted, never shifted

    def target(self, it: int) -> float:
        stage = min(it // self.stage_iters, len(self.targets) - 1)
        start = self.targets[max(0, stage - 1)]
        frac = min(1.0, (it - stage * self.stage_iters) / self.anneal_iters)
        return start + (self.targets[stage] - start) * frac

    def update(self, model, it: int, records, weights: dict, world: int = 1):
        """Shift the routers after step it, whose gate records (every micro-batch's) are records;
        across processes, by the shift of the whole global batch, so the replicas stay the same."""
        z, share = gate_logits(records, weights, self.fixed)
        if world > 1:
            z, share = gathered(z, world), gathered(share, world)
        shift_routers(model, self.gain * balancing_shift(z, share, self.target(it)), self.fixed)


def gate_logits(records, weights: dict, fixed=()):
    """Every logit of the gate records, flat (N,), and its share of the FLOP-weighted density
    (N,): weights[kind] / (its record's tokens), as in GateStats.mean. The gates of the fixed
    sublayers do not move with a shift: +inf where they keep, -inf where they skip."""
    def logits(r):
        if (r.layer, r.kind) in fixed:
            return torch.where(r.keep, math.inf, -math.inf).flatten()
        return r.z.detach().flatten().float()
    z = torch.cat([logits(r) for r in records])
    share = torch.cat([torch.full((r.z.numel(),), weights[r.kind] / r.z.numel(), dtype=torch.float64,
                                  device=r.z.device) for r in records])
    return z, share


def balancing_shift(z: torch.Tensor, share: torch.Tensor, target: float) -> float:
    """The common bias shift s after which the logits z (N,) would keep the share target of the
    FLOP-weighted density (a token keeps while z > s): a weighted quantile. s falls halfway
    between the last logit kept and the first one dropped."""
    z, order = z.sort(descending=True)
    kept = (share[order] / share.sum()).cumsum(0)          # kept[i]: density when z[0..i] keep
    i = int(torch.searchsorted(kept, kept.new_tensor([target - 1e-9])))
    movable = torch.isfinite(z).nonzero()[:, 0]            # a target out of reach: as near as it gets
    if len(movable) == 0:
        return 0.0
    i = min(max(i, int(movable[0])), int(movable[-1]))
    below = z[i + 1] if i + 1 < len(z) and torch.isfinite(z[i + 1]) else z[i] - 1.0
    return float((z[i] + below) / 2)
