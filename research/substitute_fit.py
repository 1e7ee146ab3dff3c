"""research/substitute_fit.py — how much of a sublayer's output a cheap substitute predicts, on
the text it was fitted on and on text it was not.

A token that skips a sublayer adds s(x) instead of f(x) (router.Substitute): whatever of f(x) that
s misses is what the skip loses. This probe fits candidate substitutes of every attention and
MLP sublayer of the dense model, by least squares on --fit_windows windows of --data (train.py's
corpus, spread over its files as train.py's held-out windows are), and reports R² = 1 - (residual
sum of squares) / (sum of squares about the text's own mean), on those windows and on --windows
windows of --text:

- mean:            the sublayer's mean output on the fit windows (a substitute of rank 0);
- rank r:          b + (x A) B of rank r (--ranks), fitted as controller.fit_substitutes fits it;
- previous:        c + a * y_prev, per dimension: the same sublayer's output at the token before;
- previous + rank: both, c + a * y_prev + (x A) B of rank --ranks[0], fitted together.

The last two are not in the method: a token's "previous" needs the output of the token before
at the same sublayer, which a decoding step would have to keep. Position 0 (a sink) is never a
row; it is the first row's previous.

    python -m research.substitute_fit --init=checkpoints/smollm2-135m-instruct-f32 --text=vim.txt --json

Every option below is --key=value or --key value (python -m research.substitute_fit --help).
"""
import json
import statistics

import torch

import load_weights
from configurator import AT_LEAST_1, Range, check_ranges, overrides, run_main
from controller import reduced_rank, sublayer_io
from scoring import fit_and_text_windows

DEFAULTS = dict(
    init="checkpoints/smollm2-135m-instruct-f32",  # preset name or Hugging Face folder
    data="data/corpus",            # the fit text: train.py's --data
    fit_windows=24,                # windows of the fit text the substitutes are fitted on
    text="",                       # the other text (required): R² there
    windows=8,                     # windows of --text
    seq_len=256,
    ranks=(8, 32, 128),            # ranks of the linear substitute; the first is also added to "previous"
    ridge=1e-2,                    # controller.fit_substitutes's ridge
    dtype="float32",
    device="cpu",
    json=False,                    # print the result as JSON on the last line
)
ITERATIONS = 10      # turns of the two-part fit of "previous + rank"
RANGES = dict(fit_windows=AT_LEAST_1, windows=AT_LEAST_1, seq_len=Range(3), ranks=AT_LEAST_1,
              ridge=Range(0))


def rows(found):
    """(x, y, y_prev) of one sublayer over a batch, (N, d) each in float64: every position but 0."""
    _, x, y = (t.double() for t in found)                                  # (B, T, d)
    return x[:, 1:].flatten(0, 1), y[:, 1:].flatten(0, 1), y[:, :-1].flatten(0, 1)


def passes(model, batches, keys):
    """{(layer, kind): (x, y, y_prev)} per window of batches (one forward each, the base model)."""
    for x in batches:
        found = sublayer_io(model, x[None], keys)
        yield {key: rows(io) for key, io in found.items()}


def moments(model, batches, keys) -> dict:
    """The sums the least-squares fits need, per sublayer."""
    acc = {key: {} for key in keys}
    for found in passes(model, batches, keys):
        for key, (x, y, p) in found.items():
            for name, v in (("n", len(x)), ("x", x.sum(0)), ("y", y.sum(0)), ("p", p.sum(0)), ("xx", x.T @ x),
                            ("xy", x.T @ y), ("xp", x.T @ p), ("pp", (p * p).sum(0)), ("py", (p * y).sum(0))):
                acc[key][name] = acc[key].get(name, 0) + v
    return acc


def fit(m: dict, ranks, ridge: float) -> dict:
    """{name: predictor (x, y_prev) -> y} of one sublayer, from its sums m."""
    n = m["n"]
    mx, my, mp = m["x"] / n, m["y"] / n, m["p"] / n
    cxx = m["xx"] / n - torch.outer(mx, mx)
    cxy = m["xy"] / n - torch.outer(mx, my)
    cxp = m["xp"] / n - torch.outer(mx, mp)
    out = {"mean": lambda x, p: my.expand_as(x)}
    for r in ranks:
        a, b, bias = reduced_rank(mx, my, cxx, cxy, r, ridge)
        out[f"rank {r}"] = lambda x, p, a=a, b=b, bias=bias: x @ a @ b + bias
    # previous: per dimension, y ~ c + a * y_prev
    var_p = (m["pp"] / n - mp * mp).clamp_min(1e-12)
    cpy = m["py"] / n - mp * my                                          # (d,) cov(y_prev_j, y_j)
    scale = cpy / var_p
    out["previous"] = lambda x, p: (p - mp) * scale + my
    # previous + rank: y ~ c + a * y_prev + (x - mx) A B, least squares in both by turns (each
    # step fits one part to what the other leaves; a few make the two agree)
    r = ranks[0]
    a, w = scale, torch.zeros_like(cxy)
    for _ in range(ITERATIONS):
        low, up, _ = reduced_rank(mx, torch.zeros_like(my), cxx, cxy - cxp * a, r, ridge)
        w = low @ up                                                     # (d, d) the rank-r map
        a = (cpy - (cxp * w).sum(0)) / var_p                             # cov(y_prev_j, y_j - (x W)_j) / var
    out[f"previous + rank {r}"] = lambda x, p, a=a, w=w: (p - mp) * a + (x - mx) @ w + my
    return out


def r_squared(model, batches, keys, predictors) -> dict:
    """{(layer, kind): {name: R²}} of every predictor on batches, about the batches' own mean."""
    sse = {key: {name: 0.0 for name in predictors[key]} for key in keys}
    sy, syy, n = {key: 0 for key in keys}, {key: 0.0 for key in keys}, {key: 0 for key in keys}
    for found in passes(model, batches, keys):
        for key, (x, y, p) in found.items():
            for name, f in predictors[key].items():
                sse[key][name] += ((y - f(x, p)) ** 2).sum().item()
            sy[key] = sy[key] + y.sum(0)
            syy[key] += (y * y).sum().item()
            n[key] += len(y)
    out = {}
    for key in keys:
        sst = syy[key] - (sy[key] ** 2).sum().item() / n[key]
        out[key] = {name: 1 - e / sst for name, e in sse[key].items()}
    return out


def table(result: dict, fit_name: str, text_name: str) -> str:
    """R² per sublayer, fit windows / the other text, and the median over the layers of each kind
    (a median: one layer's fit can miss another text by far, see RESULTS.md)."""
    names = list(next(iter(result["fit"].values())))
    lines = [f"R² of each substitute of a sublayer's output: fitted and measured on {fit_name} / measured on "
             f"{text_name}", f"{'layer':>6s} {'kind':4s} " + " ".join(f"{n:>19s}" for n in names)]
    for kind in ("attn", "mlp"):
        keys = [k for k in result["fit"] if k[1] == kind]
        rows_of = [(str(k[0]), [(result["fit"][k][n], result["text"][k][n]) for n in names]) for k in keys]
        medians = [tuple(statistics.median(result[part][k][n] for k in keys) for part in ("fit", "text"))
                   for n in names]
        for label, cells in rows_of + [("median", medians)]:
            lines.append(f"{label:>6s} {kind:4s} " + " ".join(f"{a:9.2f} /{b:8.2f}" for a, b in cells))
    return "\n".join(lines)


@torch.no_grad()
def substitute_fit(model, tok, config) -> dict:
    keys = [(layer, kind) for layer in range(model.cfg.n_layers) for kind in ("attn", "mlp")]
    fit_windows, text_windows = (w.to(config["device"]) for w in fit_and_text_windows(tok, config))
    sums = moments(model, fit_windows, keys)
    predictors = {key: fit(sums[key], config["ranks"], config["ridge"]) for key in keys}
    return dict(fit=r_squared(model, fit_windows, keys, predictors),
                text=r_squared(model, text_windows, keys, predictors),
                fit_windows=len(fit_windows), windows=len(text_windows))


def check(config):
    check_ranges(config, RANGES)
    if not config["text"]:
        raise ValueError("research.substitute_fit needs --text=FILE, the text the fits are measured on "
                         "beside the fit windows")
    if not config["ranks"]:
        raise ValueError("--ranks needs at least one rank, e.g. --ranks=8,32")


def main(argv):
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check(config)
    model, tok = load_weights.load(config["init"], config["dtype"], config["device"])
    model.requires_grad_(False).eval()
    if max(config["ranks"]) > model.cfg.dim:
        raise ValueError(f"--ranks={max(config['ranks'])} exceeds the model's width {model.cfg.dim}: lower it")
    result = substitute_fit(model, tok, config)
    print(table(result, f"{result['fit_windows']} windows of {config['data']}",
                f"{result['windows']} windows of {config['text']}"))
    if config["json"]:
        by_name = {part: {f"{layer} {kind}": r for (layer, kind), r in result[part].items()} for part in ("fit", "text")}
        print(json.dumps(dict(config=dict(config, ranks=list(config["ranks"])), fit_windows=result["fit_windows"],
                              windows=result["windows"], **by_name)))


if __name__ == "__main__":
    run_main(main)
