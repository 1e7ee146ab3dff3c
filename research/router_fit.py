"""research/router_fit.py — how well can a router tell, from what it sees, which tokens a skip
costs least? On the text it is fitted on and on text it was not.

A router sees the sublayer's normalized input x and decides whether the token computes. What a
skip loses is the part of the sublayer's output y = f(x) its substitute s(x) misses, relative to
the residual stream h: t = log(|y - s(x)| / |h|) (router.log_move), which the routers are fitted
to before training (controller.fit_routers). This probe asks whether a richer router would place
the skips better. For every attention and MLP sublayer of the dense model it fits, on --fit_windows
windows of --data (train.py's corpus) with s the rank --rank substitute fitted there:

- linear: t ~ w.x + b by ridge regression (what nanoskip's router is: 2 d FLOPs a token);
- mlp:    t ~ a small MLP of x (--hidden units, GELU), trained by Adam on the same rows (a router
          of ~2 d * hidden FLOPs a token, still ~1 % of an MLP sublayer's at SmolLM2's sizes).

and measures both, on the fit windows and on --windows windows of --text, as:

- R²:      of t, about the text's own mean;
- regret:  skipping the --skip share of a sublayer's tokens the predictor ranks lowest loses
           sum |y - s(x)|^2 over them; regret = (that - the oracle's) / (random's - the oracle's),
           where the oracle skips the tokens with the lowest true t and random skips any. 0: the
           oracle's choice, 1: no better than random. (The oracle is the peek rule of one sublayer.)

Position 0 (a sink, never skipped) is left out.

    python -m research.router_fit --init=checkpoints/smollm2-135m-instruct-f32 --text=vim.txt --json

Every option below is --key=value or --key value (python -m research.router_fit --help).
"""
import json
import statistics

import torch
import torch.nn.functional as F

import load_weights
import router
from configurator import AT_LEAST_1, FRACTION, Range, check_ranges, overrides, run_main
from controller import reduced_rank, ridge_solve, sublayer_io
from scoring import fit_and_text_windows

DEFAULTS = dict(
    init="checkpoints/smollm2-135m-instruct-f32",  # preset name or Hugging Face folder
    data="data/corpus",            # the fit text: train.py's --data
    fit_windows=16,                # windows of the fit text the substitutes and predictors are fitted on
    text="",                       # the other text (required)
    windows=8,                     # windows of --text
    seq_len=256,
    rank=8,                        # the substitute's rank (train.py's default --substitute)
    hidden=64,                     # units of the MLP predictor
    steps=300,                     # Adam steps of the MLP predictor (full batch)
    skip=0.25,                     # share of a sublayer's tokens skipped for the regret
    ridge=1e-2,                    # of the linear fits (controller's)
    seed=1337,
    json=False,                    # print the result as JSON on the last line
)
RANGES = dict(fit_windows=AT_LEAST_1, windows=AT_LEAST_1, seq_len=Range(3), rank=Range(0), hidden=AT_LEAST_1,
              steps=AT_LEAST_1, skip=FRACTION, ridge=Range(0), seed=Range(0))
PREDICTORS = ("linear", "mlp")


def rows(model, batches, keys) -> dict:
    """{(layer, kind): (h, x, y)} over all batches, each (N, d) in float32, position 0 left out."""
    parts = {key: [] for key in keys}
    for idx in batches:
        for key, io in sublayer_io(model, idx[None], keys).items():
            parts[key].append([t[0, 1:].float() for t in io])
    return {key: tuple(torch.cat(c) for c in zip(*p)) for key, p in parts.items()}


def substitute(x, y, rank: int, ridge: float):
    """The rank-r least-squares substitute s of y from x (controller.fit_substitutes's fit)."""
    xd, yd = x.double(), y.double()
    mx, my = xd.mean(0), yd.mean(0)
    cxx = xd.T @ xd / len(xd) - torch.outer(mx, mx)
    cxy = xd.T @ yd / len(xd) - torch.outer(mx, my)
    a, b, bias = reduced_rank(mx, my, cxx, cxy, rank, ridge)
    return lambda v: (v.double() @ a @ b + bias).float()


def fit_linear(x, t, ridge: float):
    """t ~ w.x + b, fitted as controller.fit_routers fits a router (controller.ridge_solve)."""
    xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    w = ridge_solve(xa.T @ xa, xa.T @ t.double(), ridge)
    return lambda v: (torch.cat([v, torch.ones(len(v), 1)], 1).double() @ w).float()


def fit_mlp(x, t, hidden: int, steps: int, seed: int):
    """t ~ MLP(x): d -> hidden (GELU) -> 1 on standardized x, Adam, full batch, mean squared error."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    w1 = (torch.randn(x.shape[1], hidden, generator=g) / x.shape[1] ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = torch.zeros(hidden, requires_grad=True)
    b2 = torch.full((), float(t.mean()), requires_grad=True)
    net = lambda v: F.gelu(((v - mu) / sd) @ w1 + b1) @ w2 + b2          # noqa: E731
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=3e-3, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.mse_loss(net(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lambda v: net(v).detach()


def scores(t, pred, loss, skip: float) -> dict:
    """R² of pred for t, and the regret of skipping the `skip` share pred ranks lowest."""
    r2 = 1 - float(((t - pred) ** 2).sum() / ((t - t.mean()) ** 2).sum())
    k = max(1, int(skip * len(t)))
    chosen = loss[pred.argsort()[:k]].sum()
    oracle = loss[t.argsort()[:k]].sum()
    random = loss.mean() * k
    return dict(r2=r2, regret=float((chosen - oracle) / (random - oracle)))


@torch.no_grad()
def router_fit(model, tok, config) -> dict:
    keys = [(layer, kind) for layer in range(model.cfg.n_layers) for kind in ("attn", "mlp")]
    fit_windows, text_windows = fit_and_text_windows(tok, config)
    fit_rows, text_rows = rows(model, fit_windows, keys), rows(model, text_windows, keys)
    out = {"fit": {}, "text": {}}
    for key in keys:
        h, x, y = fit_rows[key]
        s = substitute(x, y, config["rank"], config["ridge"])
        t = router.log_move(h, y - s(x))                                   # (N,) what a skip loses
        predictors = dict(linear=fit_linear(x, t, config["ridge"]),
                          mlp=fit_mlp(x, t, config["hidden"], config["steps"], config["seed"]))
        for part, (h, x, y) in (("fit", fit_rows[key]), ("text", text_rows[key])):
            miss = y - s(x)
            t, loss = router.log_move(h, miss), (miss ** 2).sum(-1)
            out[part][key] = {name: scores(t, f(x), loss, config["skip"]) for name, f in predictors.items()}
    return dict(out, fit_windows=len(fit_windows), windows=len(text_windows))


def medians(result: dict, part: str, kind: str, name: str, metric: str) -> float:
    return statistics.median(v[name][metric] for (_, k), v in result[part].items() if k == kind)


def table(result: dict, config: dict) -> str:
    lines = [f"What a skip loses, predicted from the router's input: medians over the layers "
             f"(fit: {result['fit_windows']} windows of {config['data']}; text: {result['windows']} windows of "
             f"{config['text']}; regret at skip share {config['skip']}: 0 = oracle, 1 = random)",
             f"{'kind':5s} {'predictor':9s} {'R² fit':>7s} {'R² text':>8s} {'regret fit':>11s} {'regret text':>12s}"]
    for kind in ("attn", "mlp"):
        for name in PREDICTORS:
            cells = [medians(result, part, kind, name, metric) for metric in ("r2", "regret") for part in ("fit", "text")]
            lines.append(f"{kind:5s} {name:9s} {cells[0]:7.2f} {cells[1]:8.2f} {cells[2]:11.2f} {cells[3]:12.2f}")
    return "\n".join(lines)


def check(config):
    check_ranges(config, RANGES)
    if not config["text"]:
        raise ValueError("research.router_fit needs --text=FILE, the text the predictors are measured on "
                         "beside the fit windows")


def main(argv):
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check(config)
    torch.manual_seed(config["seed"])
    model, tok = load_weights.load(config["init"], "float32", "cpu")
    model.requires_grad_(False).eval()
    if config["rank"] > model.cfg.dim:
        raise ValueError(f"--rank={config['rank']} exceeds the model's width {model.cfg.dim}: lower it")
    result = router_fit(model, tok, config)
    print(table(result, config))
    if config["json"]:
        by_name = {part: {f"{layer} {kind}": r for (layer, kind), r in result[part].items()} for part in ("fit", "text")}
        print(json.dumps(dict(config=config, fit_windows=result["fit_windows"], windows=result["windows"], **by_name)))
    return result


if __name__ == "__main__":
    run_main(main)
