"""eval.py — perplexity of a model on a text file; for a sparse checkpoint, what sparsity cost.

    python eval.py --init=smollm2-135m-instruct --text=val.txt --seq_len=512
    python eval.py --ckpt=out/smol --text=val.txt --json --plot=density.svg
    python eval.py --ckpt=out/smol --text=val.txt --gates=random   # baseline: same densities, random tokens
    python eval.py --init=checkpoints/smollm2-135m-instruct-f32 --tasks=../shared/data/benchmarks/bigbench --limit=100
    python eval.py --init=sparse-model/ --text=val.txt             # a folder export.py wrote

One convention, so numbers compare across the repository's tools:
- tokenize the whole text without special tokens and cut it into consecutive windows of
  seq_len tokens, dropping the incomplete tail;
- prepend BOS to each window exactly when the tokenizer's own post-processor adds one
  (Gemma's does, SmolLM2's does not): the model sees text the way it was trained to
  (data/prepare.py; train.py's windows follow the same convention);
- score every token that has a predecessor in its window: seq_len per window with BOS,
  seq_len - 1 without;
- perplexity = exp(mean negative log-likelihood over the scored tokens).

With --ckpt the sparse model is compared with its base model (LoRA off, every gate open) on the
same windows: perplexity of both, mean KL(p_dense || p_sparse) over scored tokens, top-1
agreement, density (fraction of (token, sublayer) slots computed; a sublayer without a router
counts as computed) per layer, per kind and overall, the compute ratio of the FLOP model
(flops.compute_ratio), and the wall-clock seconds of the sparse and the dense pass.
--gates picks what decides the skips:
  learned  the checkpoint's routers (default);
  random   every router keeps a random share of tokens equal to the density its learned gates
           show on this same text: the baseline a learned router has to beat;
  open     every gate open, LoRA on: what the adapters alone do;
  peek     the training-free reference: the base weights (LoRA off, routers ignored), and a
           token computes a sublayer iff |f(x)| / |h| per FLOP a skip there saves is above
           one global threshold, chosen so that the compute ratio on this text is
           --target_compute (+-0.005). It computes f(x) to decide, so it saves nothing: it
           shows how good per-token decisions can be before any training. Without --ckpt it
           attaches routers to every sublayer of the --init model.
A folder written by export.py (--init) is the sparse model with no base beside it: its
perplexity, density and compute ratio, nothing compared with a dense model.
--path=masked runs the training path (every token computes, the gate multiplies) instead of
the compacted one; both must give the same numbers.

--tasks runs benchmarks instead of perplexity, on BIG-bench task files (each example an `input`
and `target_scores` {choice: score}, the highest-scored choices correct; arithmetic adds `target`):
- prompt = task_prefix + example_input_prefix + input + example_output_prefix, with the file's
  own prefixes, else "", "\nQ: ", "\nA: " (BIG-bench's defaults): "\nQ: What is 3 plus 5?\nA: ".
  The choices are not listed in the prompt (append_choices_to_input is not applied).
- multiple choice, as lm-evaluation-harness scores it: each choice is a continuation of the
  prompt; trailing spaces of the prompt move to the front of the continuation (context
  "...\nA:", continuation " 8"); the continuation's tokens are encode(context + continuation)
  after the first len(encode(context)) tokens, so they are the tokens the model sees in running
  text; encode adds special tokens as the tokenizer's post-processor does (BOS for Gemma, none
  for SmolLM2: lm_eval's hf default). ll = sum of the continuation tokens' log-probabilities.
  acc: the argmax of ll is a correct choice; acc_norm: the same for ll / len(choice in
  characters); chance: the mean over examples of (correct choices / choices).
- exact match (tasks whose preferred_score is exact_str_match: the arithmetic files): greedy,
  KV-cached generation after the prompt until a newline, EOS or --max_new_tokens; the answer is
  the first match of the file's output_regex in the generated text, else the first number
  ([-+]?\\d+(\\.\\d+)?); it scores 1 when it equals the target.
- each score is a mean over n examples, reported with its standard error sqrt(p (1 - p) / n);
  with --ckpt, dense (LoRA off, every gate open) and sparse (--gates) side by side, and the
  sparse model's density and compute ratio on the multiple-choice tokens themselves (padding
  left out; the compute ratio at their mean length).
- --gates=random keeps the densities the learned gates show on --text; --gates=peek takes the
  threshold that gives --target_compute on --text (so both need it), scores the choices on the
  masked path, and generates on the masked path without a KV cache (each new token recomputes
  the whole sequence: slower, and the same tokens as cached decoding would give).

--suite is one table for one checkpoint (--ckpt and --text; with --tasks, its benchmarks too),
one row per metric, dense | sparse | sparse vs dense, and its JSON:
- quality on --text as above: perplexity of both and their ratio, KL, top-1 agreement, density,
  compute ratio; with --tasks every benchmark, dense vs sparse;
- speed, measured last, with bench.py's timing: the LoRA adapters are merged into the weights
  first (so they cost nothing), and the model with its gates runs against the same model with
  routers off, in this process, interleaved: prefill of the text's first 1 x seq_len tokens, and
  --decode_tokens greedy KV-cached steps after a prompt of seq_len tokens; medians of --repeat
  runs; speedup = dense seconds / sparse seconds, beside the FLOP model's 1 / compute ratio.
  Peek gates compute f(x) to decide, so they save nothing: they get no speed.

--by_class and --by_position show what skips, under the gates of --gates: density per token
class (digits, punctuation, first piece of a word, function words, code, ...) and per position
bucket in the window, overall and per layer (skips.py defines the classes and the buckets); with
--plot, a heatmap of both.

Every option below is --key=value or --key value (python eval.py --help lists them). --json
prints the results as one JSON object on the last line.
"""
import contextlib
import glob
import json
import math
import re
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from xml.sax.saxutils import escape

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bench
import load_weights
import lora
import router
import sample
import skips
from configurator import AT_LEAST_0, AT_LEAST_1, Range, check_ranges, overrides
from data.prepare import consecutive_windows
from flops import compute_ratio, skip_savings

DEFAULTS = dict(
    init="smollm2-135m-instruct",   # model: a preset name or a Hugging Face-format folder (with --ckpt: its base)
    ckpt="",                        # a train.py out_dir: evaluate its sparse model against its base
    text="",                        # the text file to score (hold it out of training)
    seq_len=512,                    # window length in text tokens (BOS not counted)
    batch_size=4,                   # windows per forward pass
    max_chunks=0,                   # score only the first N windows; 0 = all
    dtype="float32",                # float32 | bfloat16 | float16
    device="cpu",                   # cpu | cuda | cuda:1 | mps
    path="compact",                 # --ckpt: compact (skipped work removed) | masked (training path)
    gates="learned",                # --ckpt: learned | random | open | peek (see above)
    target_compute=0.9,             # --gates=peek: the compute ratio its threshold aims at
    seed=1337,                      # for --gates=random
    json=False,                     # print the results as one JSON object on the last line
    plot="",                        # --ckpt: write density per layer to this .svg file (with
                                    # --by_class/--by_position: density per group and layer)
    frontier="",                    # eval.py --json result files (comma-separated, globs allowed):
                                    # draw perplexity vs compute ratio per gates to --plot, then stop
    tasks="",                       # benchmarks: a folder of BIG-bench task .json files, or files joined by ","
    limit=0,                        # benchmarks: the first N examples of each task; 0 = all
    requests_per_batch=16,          # benchmarks: (context, continuation) pairs or prompts per forward pass
    max_new_tokens=16,              # benchmarks: longest generated answer (exact match)
    suite=False,                    # --ckpt: one table of speed, compute, quality and benchmarks (see above)
    repeat=3,                       # --suite: timed runs per path (the median is reported)
    decode_tokens=32,               # --suite: greedy steps timed after a prompt of seq_len tokens
    by_class=False,                 # density by token class (skips.py)
    by_position=False,              # density by position in the window (skips.py)
)
RANGES = dict(seq_len=AT_LEAST_1, batch_size=AT_LEAST_1, max_chunks=AT_LEAST_0, seed=AT_LEAST_0,
              target_compute=Range(0, 1, open_lo=True), limit=AT_LEAST_0, requests_per_batch=AT_LEAST_1,
              max_new_tokens=AT_LEAST_1, repeat=AT_LEAST_1, decode_tokens=AT_LEAST_1)
HEAD_ROWS = 256   # logits made this many tokens at a time: (rows, V) float32, not (B*T, V)


def windows(tok, text: str, seq_len: int, max_chunks: int = 0) -> torch.Tensor:
    """The text as (N, seq_len [+ 1 with BOS]) token ids, following the convention above."""
    bos = tok.bos_id if tok.adds_bos else None
    return consecutive_windows(tok.encode(text, special=False), seq_len, bos, max_chunks)


class Stopwatch:
    """Wall-clock seconds per name, waiting for the GPU so its work is counted."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = defaultdict(float)

    @contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - t0


def sparse_hidden(model, x, path="compact"):
    """Final hidden states (B, T, d) of the model as its routers decide, and its gate records."""
    return model(x, masked=path == "masked", return_hidden=True)


def dense_hidden(model, x):
    """The base model: routers off, LoRA off."""
    with lora.disabled(model):
        return model(x, routers_off=True, return_hidden=True)[0]


@torch.no_grad()
def evaluate(model, chunks, batch_size=4, compare=False, path="compact", desc=None):
    """Sums over the windows chunks (N, L): the model's NLL and seconds (model_s); with compare,
    the model is the sparse one (path), also run against its dense base: the base's NLL,
    KL, top-1 agreement and seconds (dense_s). desc: the progress bar's label (None: no bar).

    Returns (sums, router.GateStats of the model's gate decisions).
    """
    device = model.tok_emb.weight.device
    sums, stats = defaultdict(float), router.GateStats()
    watch = Stopwatch(device)
    if compare:   # warm up both passes, untimed
        first = chunks[:1, :-1].to(device)
        sparse_hidden(model, first, path)
        dense_hidden(model, first)
    for batch in tqdm(chunks.to(device).split(batch_size), desc=desc, disable=desc is None, leave=False):
        x, y = batch[:, :-1], batch[:, 1:]                        # (B, T) inputs and their next tokens
        with watch("model"):
            h, records = sparse_hidden(model, x, path)            # (B, T, d)
        stats.add(records)
        if compare:
            with watch("dense"):
                h_ref = dense_hidden(model, x)
        for rows in torch.arange(y.numel(), device=device).split(HEAD_ROWS):
            target = y.flatten()[rows]                            # (R,)
            with watch("model"):
                logits = load_weights.finite(model.logits(h.flatten(0, 1)[rows]))             # (R, V)
                logp = F.log_softmax(logits.float(), dim=-1)
            sums["nll"] += float(F.nll_loss(logp, target, reduction="sum"))
            sums["tokens"] += len(rows)
            if compare:
                with watch("dense"):
                    logits_ref = load_weights.finite(model.logits(h_ref.flatten(0, 1)[rows]), "the base model")
                    logp_ref = F.log_softmax(logits_ref.float(), dim=-1)
                sums["nll_dense"] += float(F.nll_loss(logp_ref, target, reduction="sum"))
                sums["kl"] += float(F.kl_div(logp, logp_ref, log_target=True, reduction="sum"))
                sums["agree"] += int((logp.argmax(-1) == logp_ref.argmax(-1)).sum())
    sums.update({f"{name}_s": s for name, s in watch.seconds.items()})
    return sums, stats


@torch.no_grad()
def gate_stats(model, chunks, batch_size=4, path="compact", desc=None) -> router.GateStats:
    """The gate decisions of the model on the windows chunks (N, L), without scoring them."""
    stats = router.GateStats()
    batches = chunks.to(model.tok_emb.weight.device).split(batch_size)
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        stats.add(model(batch[:, :-1], masked=path == "masked", return_hidden=True)[1])
    return stats


def peek_threshold(model, chunks, seq_len, target: float, batch_size=4, tol=0.004) -> dict:
    """forced()'s table of peek gates whose compute ratio on chunks is target +- tol.

    The compute ratio falls as the global log threshold rises; regula falsi (Illinois) finds it
    in a few passes, each a masked forward over the windows with the base weights.
    """
    savings = skip_savings(model.cfg, seq_len)

    def excess(t):                                       # compute ratio at threshold t, minus target
        with router.forced(model, router.peek_gates(model, t, savings)), lora.disabled(model):
            stats = gate_stats(model, chunks, batch_size, "masked", f"peek threshold {t:.2f}")
            return compute_ratio(model.cfg, seq_len, stats.density()) - target

    lo, hi = -40.0, 10.0                                 # every token computes / only the sinks do
    f_lo, f_hi = excess(lo), excess(hi)
    if f_lo < 0 or f_hi > 0:
        raise ValueError(f"--target_compute={target} is outside what peek gates reach on this text "
                         f"({f_hi + target:.3f} to {f_lo + target:.3f})")
    side = 0
    for _ in range(40):
        t = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)      # where the chord crosses zero
        f = excess(t)
        if abs(f) <= tol:
            return router.peek_gates(model, t, savings)
        if f > 0:
            lo, f_lo = t, f
            f_hi, side = (f_hi / 2, 1) if side == 1 else (f_hi, 1)     # Illinois: halve the stale end
        else:
            hi, f_hi = t, f
            f_lo, side = (f_lo / 2, -1) if side == -1 else (f_lo, -1)
    raise ValueError(f"no peek threshold reaches --target_compute={target} within {tol}")


@contextmanager
def gates_as(model, chunks, seq_len, gates="learned", path="compact", batch_size=4, seed=1337, target_compute=0.9):
    """Inside the block the model's gates are as --gates says (see the docstring on top); yields
    the path to run them on (peek gates decide from f(x): masked). chunks (N, L): the windows on
    which random gates measure the learned densities and peek gates choose their threshold."""
    table = {} if gates == "learned" else gates
    if gates == "random":
        # the densities the learned routers show on this text, then coin flips at those rates
        table = gate_stats(model, chunks, batch_size, path).density()
    adapters_off = lora.disabled(model) if gates == "peek" else contextlib.nullcontext()
    if gates == "peek":
        table, path = peek_threshold(model, chunks, seq_len, target_compute, batch_size), "masked"
    torch.manual_seed(seed)
    with router.forced(model, table), adapters_off:
        yield path


def evaluate_sparse(model, chunks, seq_len, batch_size=4, path="compact", gates="learned", seed=1337,
                    target_compute=0.9) -> dict:
    """The sparse model against its base model on the same windows (see the docstring on top)."""
    with gates_as(model, chunks, seq_len, gates, path, batch_size, seed, target_compute) as path:
        return compare_dense(model, chunks, seq_len, batch_size, path)


def compare_dense(model, chunks, seq_len, batch_size=4, path="compact") -> dict:
    """The model as its gates are set now against its base (LoRA off, routers off) on chunks (N, L).

    Densities count a sublayer without a router as computed (1), per layer and in the averages.
    """
    sums, stats = evaluate(model, chunks, batch_size, compare=True, path=path, desc="sparse and dense")
    n, L = sums["tokens"], model.cfg.n_layers
    return dict(
        perplexity=math.exp(sums["nll"] / n), nll=sums["nll"] / n, tokens=int(n),
        dense_perplexity=math.exp(sums["nll_dense"] / n),
        kl_to_dense=sums["kl"] / n, top1_agreement=sums["agree"] / n,
        density=stats.mean(n_layers=L), density_attn=stats.mean("attn", n_layers=L),
        density_mlp=stats.mean("mlp", n_layers=L),
        compute_ratio=compute_ratio(model.cfg, seq_len, stats.density()),
        per_layer=stats.per_layer(L),
        sparse_s=sums["model_s"], dense_s=sums["dense_s"], speedup=sums["dense_s"] / sums["model_s"],
    )


def density_svg(per_layer, title: str) -> str:
    """Density per layer as two bar series (attention, MLP), in a small hand-written SVG."""
    W, H, left, right, top, bottom = 720, 320, 56, 16, 44, 44
    plot_w, plot_h = W - left - right, H - top - bottom
    slot = plot_w / len(per_layer)
    bar = 0.4 * slot
    colors = {"attn": "#4c78a8", "mlp": "#f58518"}

    def y(d):
        return top + plot_h * (1 - d)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for tick in (0, 0.25, 0.5, 0.75, 1):                                      # y axis and grid
        svg.append(f'<line x1="{left}" x2="{W - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>')
        svg.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for i, row in enumerate(per_layer):                                        # the bars
        for j, kind in enumerate(("attn", "mlp")):
            x = left + i * slot + 0.1 * slot + j * bar
            svg.append(f'<rect x="{x:.1f}" y="{y(row[kind]):.1f}" width="{bar:.1f}" '
                       f'height="{plot_h * row[kind]:.1f}" fill="{colors[kind]}"/>')
        svg.append(f'<text x="{left + (i + 0.5) * slot:.1f}" y="{H - bottom + 14}" '
                   f'text-anchor="middle">{row["layer"]}</text>')
    svg.append(f'<text x="{left + plot_w / 2}" y="{H - 8}" text-anchor="middle">layer</text>')
    svg.append(f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" '
               f'text-anchor="middle">density (share of tokens computed)</text>')
    for j, kind in enumerate(("attn", "mlp")):                                 # legend
        svg.append(f'<rect x="{W - right - 110 + 55 * j}" y="28" width="10" height="10" fill="{colors[kind]}"/>')
        svg.append(f'<text x="{W - right - 96 + 55 * j}" y="37">{kind}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


GATES_METHOD = {"learned": "routed (ours)", "random": "random gates", "peek": "peek rule", "open": "LoRA only"}
STATIC_METHOD = {"kl": "static sublayers, KL", "bi": "static sublayers, BI", "layer": "static blocks (ShortGPT)"}


def method(train_config: dict, gates: str) -> str:
    """What made a result's skips, as the frontier plot and the tables name it: the gates, or
    for a checkpoint's own gates how it was trained (a static baseline, a route, a kv mode)."""
    if gates != "learned":
        return GATES_METHOD[gates]
    if train_config.get("prune"):
        return STATIC_METHOD[train_config["prune"]] + (" + routed" if train_config.get("prune_routed") else "")
    variants = [f"{k}={train_config[k]}" for k, plain in (("route", "sublayer"), ("kv", "all"))
                if train_config.get(k, plain) != plain]
    return "routed, " + ", ".join(variants) if variants else GATES_METHOD["learned"]


def frontier_svg(rows, title: str) -> str:
    """Perplexity ratio (sparse / dense) against compute ratio, one line per method.

    rows: eval.py --json results (each with compute_ratio, perplexity, dense_perplexity, and
    method, or for older results gates).
    """
    W, H, left, right, top, bottom = 700, 360, 60, 250, 40, 48
    curves = defaultdict(list)
    for r in rows:
        name = r.get("method", GATES_METHOD.get(r.get("gates"), "?"))
        curves[name].append((r["compute_ratio"], r["perplexity"] / r["dense_perplexity"]))
    xs = [x for pts in curves.values() for x, _ in pts]
    ys = [y for pts in curves.values() for _, y in pts] + [1.0]
    x0, x1, y0, y1 = min(xs) - 0.01, 1.0, 1.0, max(ys) * 1.05
    px = lambda x: left + (W - left - right) * (x - x0) / (x1 - x0)          # noqa: E731
    py = lambda y: top + (H - top - bottom) * (1 - (y - y0) / (y1 - y0))    # noqa: E731
    palette = ["#4c78a8", "#e45756", "#54a24b", "#f58518", "#b279a2", "#9d755d", "#72b7b2", "#eeca3b",
               "#999", "#17becf", "#000", "#ff9da6"]
    fixed = {GATES_METHOD["learned"]: palette[0], GATES_METHOD["random"]: palette[1], GATES_METHOD["peek"]: palette[2]}
    others = iter(palette[3:] * 3)
    colors = {name: fixed.get(name) or next(others) for name in sorted(curves)}
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11">', f'<text x="{(W - right) / 2}" y="18" text-anchor="middle" font-size="13">'
           f'{escape(title)}</text>']
    for i in range(6):                                                        # grid and tick labels
        x, y = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        svg.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{H - bottom}" stroke="#eee"/>')
        svg.append(f'<text x="{px(x):.1f}" y="{H - bottom + 14}" text-anchor="middle">{x:.2f}</text>')
        svg.append(f'<line x1="{left}" x2="{W - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for j, (name, pts) in enumerate(sorted(curves.items())):                  # one polyline per method
        pts = sorted(pts)
        color = colors[name]
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5 3"' if name.startswith("static") and "routed" not in name else ""   # no router
        svg.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        svg += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"/>' for x, y in pts]
        svg.append(f'<rect x="{W - right + 16}" y="{top + 18 * j}" width="10" height="10" fill="{color}"/>')
        svg.append(f'<text x="{W - right + 32}" y="{top + 18 * j + 9}">{escape(name)}</text>')
    svg.append(f'<text x="{left + (W - left - right) / 2}" y="{H - 10}" text-anchor="middle">'
               f'compute ratio (FLOPs per token / dense)</text>')
    svg.append(f'<text transform="translate(14 {top + (H - top - bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">perplexity / dense perplexity</text>')
    svg.append("</svg>")
    return "\n".join(svg)


# ----------------------------------------------------------------------------------------------
# Benchmarks: multiple choice by log-likelihood, exact match by greedy generation (--tasks)
# ----------------------------------------------------------------------------------------------

FIRST_NUMBER = r"[-+]?\d+(?:\.\d+)?"   # the answer of a task file without output_regex


@dataclass
class Task:
    """One BIG-bench task file (see the docstring on top for how it becomes prompts)."""
    name: str
    examples: list              # {"input": str, "target_scores": {choice: score}[, "target": str]}
    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    output_regex: Optional[str] = None
    exact_match: bool = False   # preferred_score exact_str_match: also score a generated answer


def read_task(path) -> Task:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read task file {path} ({e}): pass a BIG-bench task .json") from None
    examples = d.get("examples") if isinstance(d, dict) else None
    if not examples or any(not ex.get("target_scores") or "" in ex["target_scores"] for ex in examples):
        raise ValueError(f"{path}: every example needs an input and non-empty choices in target_scores "
                         "(a BIG-bench multiple-choice task file)")
    return Task(Path(path).stem, examples, d.get("task_prefix", ""), d.get("example_input_prefix", "\nQ: "),
                d.get("example_output_prefix", "\nA: "), d.get("output_regex"),
                d.get("preferred_score") == "exact_str_match")


def task_paths(spec: str) -> list:
    """--tasks: a folder (its *.json files, sorted) or files joined by ","."""
    if Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.json"))
    else:
        paths = [Path(p) for p in spec.split(",") if p]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ValueError(f"--tasks={spec}: {', '.join(missing) or 'no .json files'} not found; "
                         "pass a folder of task files or files joined by ','")
    return paths


def prompt(task: Task, example: dict) -> str:
    return task.task_prefix + task.input_prefix + example["input"] + task.output_prefix


def encode_pair(tok, context: str, continuation: str):
    """(context ids, continuation ids), split the way lm-evaluation-harness splits them: the
    context's trailing spaces join the continuation, the whole string is encoded once, and the
    continuation is what follows the context's own encoding."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    if not ctx or len(whole) <= len(ctx):
        raise ValueError(f"cannot score {continuation!r} after {context!r}: the context or the continuation "
                         "encodes to no tokens")
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model, requests, batch_size=16, dense=False, desc=None, path="compact",
                          stats=None) -> list:
    """requests: (context ids, continuation ids) pairs -> (log p(continuation | context), greedy) each.

    Each pair is read as context + continuation without its last token, right-padded to the
    longest of its batch (attention is causal: padding after a sequence never reaches it); the
    continuation's log-probabilities come from the positions just before its tokens. greedy:
    every continuation token is the argmax (lm_eval's is_greedy). A pair longer than the model's
    context keeps its last max_seq_len + 1 tokens, as lm_eval truncates. dense: LoRA off, routers off;
    else the model as its gates are set, on path. stats: a router.GateStats that counts the gates
    of the requests' own tokens (not the padding).
    """
    device, L = model.tok_emb.weight.device, model.cfg.max_seq_len
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, disable=desc is None, leave=False) as bar:
        for idx in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
            seqs = [(requests[i][0] + requests[i][1])[-(L + 1):-1] for i in idx]
            T = max(map(len, seqs))
            x = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)   # (B, T) right-padded
            if dense:
                h = dense_hidden(model, x)                                              # (B, T, d)
            else:
                h, records = sparse_hidden(model, x, path)
                if stats is not None:                                                   # padding left out
                    lengths = torch.tensor([len(s) for s in seqs], device=device)
                    real = torch.arange(T, device=device) < lengths[:, None]               # (B, T)
                    stats.add(router.GateRecord(r.layer, r.kind, r.z, r.keep[real]) for r in records)
            for b, i in enumerate(idx):
                cont = torch.tensor(requests[i][1], device=device)                      # (n,)
                end = len(seqs[b])
                logp = F.log_softmax(model.logits(h[b, end - len(cont):end]).float(), dim=-1)   # (n, V)
                out[i] = float(logp.gather(1, cont[:, None]).sum()), bool((logp.argmax(-1) == cont).all())
            bar.update(len(idx))
    return out


def cut_at(text: str, until) -> str:
    """text up to the first occurrence of any stop string."""
    for s in until:
        text = text.split(s)[0]
    return text


@torch.no_grad()
def masked_decode(model, idx, max_new_tokens, temperature=0.0):
    """Yield next ids (B, 1) step by step like sample.decode, without a KV cache: every step runs
    the whole sequence (B, T + steps) on the masked path, where peek gates can decide."""
    if idx.shape[1] + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the prompt ({idx.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) exceed "
                         f"the model's context of {model.cfg.max_seq_len} tokens: lower --max_new_tokens")
    x = idx
    for _ in range(max_new_tokens):
        logits, records = model(x, masked=True, last_only=True)                   # (B, 1, V)
        nxt = sample.sample_next(load_weights.finite(logits[:, -1]), temperature)   # (B, 1)
        x = torch.cat([x, nxt], dim=1)
        yield nxt, records


def generate_batch(model, tok, x, until, max_new_tokens, dense=False, temperature=0.0, path="compact") -> list:
    """x (B, T) prompts of one length -> the text each generates, cut before its first stop string.

    A sequence stops at EOS or once its text holds a stop string, the batch once all stopped.
    The sparse model on the masked path decodes without a cache (masked_decode)."""
    new, done = [[] for _ in range(len(x))], [False] * len(x)
    if path == "masked" and not dense:
        steps = masked_decode(model, x, max_new_tokens, temperature)
    else:
        steps = sample.decode(model, x, max_new_tokens, temperature, eos_ids=tok.eos_ids, routers_off=dense)
    with lora.disabled(model) if dense else contextlib.nullcontext():
        for step, _ in steps:
            for b, t in enumerate(step[:, 0].tolist()):                # step (B, 1)
                if done[b]:
                    continue
                done[b] = t in tok.eos_ids
                if not done[b]:
                    new[b].append(t)
                    done[b] = any(s in tok.decode(new[b]) for s in until)
            if all(done):
                break
    return [cut_at(tok.decode(ids), until) for ids in new]


@torch.no_grad()
def generate_until(model, tok, prompts, until=("\n",), max_new_tokens=16, batch_size=16, dense=False,
                   temperature=0.0, desc=None, path="compact") -> list:
    """prompts: lists of token ids -> the text generated after each (KV-cached, sample.decode;
    greedy at temperature 0), cut before the first stop string of until; the sparse model on
    path="masked" decodes without a cache (peek gates need it).

    A batch holds prompts of one token length only, so nothing is padded (the model has no
    padding mask). A prompt longer than the context less max_new_tokens keeps its last tokens.
    """
    until = [s for s in until if s]
    keep = model.cfg.max_seq_len - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.cfg.max_seq_len} tokens: lower it")
    prompts = [p[-keep:] for p in prompts]
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out = [None] * len(prompts)
    device = model.tok_emb.weight.device
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False) as bar:
        for members in by_length.values():
            for idx in (members[i:i + batch_size] for i in range(0, len(members), batch_size)):
                x = torch.tensor([prompts[i] for i in idx], device=device)            # (B, T)
                texts = generate_batch(model, tok, x, until, max_new_tokens, dense, temperature, path)
                for i, text in zip(idx, texts):
                    out[i] = text
                bar.update(len(idx))
    return out


def extract_answer(text: str, regex: Optional[str] = None) -> str:
    """The first match of regex (the task's output_regex), else of the first number; "" if none."""
    m = re.search(regex or FIRST_NUMBER, text)
    return m.group(0) if m else ""


def choice_hits(lls, choices, scores):
    """(acc, acc_norm) of one example: is the argmax of ll, and of ll per character, a best choice?"""
    best = {i for i, s in enumerate(scores) if s == max(scores)}
    pred = max(range(len(lls)), key=lambda i: lls[i])
    pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))
    return float(pred in best), float(pred_norm in best)


def multiple_choice(model, tok, task, examples, batch_size=16, dense=False, desc=None, path="compact",
                    stats=None) -> dict:
    """{"acc": [0/1 per example], "acc_norm": [...]} of the choices' log-likelihoods
    (path, stats: as continuation_logprobs takes them)."""
    requests = [encode_pair(tok, prompt(task, ex), choice) for ex in examples for choice in ex["target_scores"]]
    lls = iter([ll for ll, _ in continuation_logprobs(model, requests, batch_size, dense, desc, path, stats)])
    hits = {"acc": [], "acc_norm": []}
    for ex in examples:
        mine = [next(lls) for _ in ex["target_scores"]]           # this example's choices, in order
        acc, acc_norm = choice_hits(mine, list(ex["target_scores"]), list(ex["target_scores"].values()))
        hits["acc"].append(acc)
        hits["acc_norm"].append(acc_norm)
    return hits


def exact_match(model, tok, task, examples, batch_size=16, max_new_tokens=16, dense=False, desc=None,
                path="compact") -> list:
    """0/1 per example: the answer extracted from the greedy generation equals the target."""
    prompts = [tok.encode(prompt(task, ex)) for ex in examples]
    texts = generate_until(model, tok, prompts, ("\n",), max_new_tokens, batch_size, dense, desc=desc, path=path)
    targets = [ex["target"] if isinstance(ex["target"], list) else [ex["target"]] for ex in examples]
    return [float(extract_answer(t, task.output_regex) in [str(a).strip() for a in ts])
            for t, ts in zip(texts, targets)]


def mean_stderr(hits) -> tuple:
    """(p, sqrt(p (1 - p) / n)) of n 0/1 scores."""
    p = sum(hits) / len(hits)
    return p, math.sqrt(p * (1 - p) / len(hits))


def benchmark(model, tok, task, limit=0, batch_size=16, max_new_tokens=16, variants=("dense",),
              path="compact") -> dict:
    """One task's row: examples, chance, and for each metric and variant ("dense": LoRA off,
    routers off; "sparse": the model as its routers are set, on path) the score and its standard
    error; for "sparse" also the density and compute ratio on the multiple-choice tokens."""
    examples = task.examples[:limit or None]
    scores = [list(ex["target_scores"].values()) for ex in examples]
    row = dict(task=task.name, examples=len(examples),
               chance=sum(s.count(max(s)) / len(s) for s in scores) / len(examples))
    for variant in variants:
        dense = variant == "dense"
        stats = None if dense else router.GateStats()
        metrics = multiple_choice(model, tok, task, examples, batch_size, dense, f"{task.name} {variant} mc",
                                  path, stats)
        if task.exact_match and all("target" in ex for ex in examples):
            metrics["exact_match"] = exact_match(model, tok, task, examples, batch_size, max_new_tokens, dense,
                                                 f"{task.name} {variant} generate", path)
        for metric, hits in metrics.items():
            row[f"{metric}_{variant}"], row[f"{metric}_{variant}_stderr"] = mean_stderr(hits)
        if stats is not None and stats.slots:
            tokens = next(iter(stats.slots.values()))             # the requests' tokens, all of them
            requests = sum(len(ex["target_scores"]) for ex in examples)
            row[f"density_{variant}"] = stats.mean(n_layers=model.cfg.n_layers)
            row[f"compute_ratio_{variant}"] = compute_ratio(model.cfg, max(1, round(tokens / requests)),
                                                            stats.density())
    return row


def benchmark_table(rows, variants) -> str:
    """The rows as a Markdown table: one line per task and metric, p ± stderr per variant."""
    lines = ["| task | n | chance | metric | " + " | ".join(variants) + " |",
             "|---|---|---|---|" + "---|" * len(variants)]
    for row in rows:
        for metric in ("acc", "acc_norm", "exact_match"):
            if f"{metric}_{variants[0]}" in row:
                chance = f"{row['chance']:.3f}" if metric != "exact_match" else "–"
                cells = [f"{row[f'{metric}_{v}']:.3f} ± {row[f'{metric}_{v}_stderr']:.3f}" for v in variants]
                lines.append(f"| {row['task']} | {row['examples']} | {chance} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_benchmarks(config, model, tok, name):
    """--tasks: every task file, dense (and with --ckpt or --gates=peek, sparse), printed as a table."""
    variants = ("dense", "sparse") if config["ckpt"] or config["gates"] == "peek" else ("dense",)
    tasks = [read_task(p) for p in task_paths(config["tasks"])]
    gates = config["gates"] if "sparse" in variants else "learned"
    chunks = None                                       # the windows random and peek gates are set on
    if config["text"]:
        chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    with gates_as(model, chunks, config["seq_len"], gates, config["path"], config["batch_size"], config["seed"],
                  config["target_compute"]) as path:
        rows = [benchmark(model, tok, t, config["limit"], config["requests_per_batch"], config["max_new_tokens"],
                          variants, path) for t in tqdm(tasks, desc="tasks")]
    print(f"{name}" + (f", sparse gates {gates}" if "sparse" in variants else "")
          + f": first {config['limit'] or 'all'} examples per task")
    print(benchmark_table(rows, variants))
    return dict(model=name, ckpt=config["ckpt"] or None, gates=gates if "sparse" in variants else None,
                limit=config["limit"], tasks=rows)


# ----------------------------------------------------------------------------------------------
# One table (--suite) and what skips (--by_class, --by_position)
# ----------------------------------------------------------------------------------------------

def synced_clock():
    """bench.py's clock on a GPU: wait for its queued work, so that the work is counted."""
    torch.cuda.synchronize()
    return time.perf_counter()


def speed(model, tok, config) -> list:
    """bench.py's [prefill row, decode row] for the model's gates as they are set now, after
    merging LoRA into the weights (for good: call it last). Dense = the same model, routers off."""
    T, n = config["seq_len"], config["decode_tokens"]
    if T + n > model.cfg.max_seq_len:
        raise ValueError(f"--seq_len={T} plus --decode_tokens={n} exceed the model's context of "
                         f"{model.cfg.max_seq_len}: lower one of them")
    lora.merge(model)                                  # W += scale * B A: adapters cost nothing
    if torch.device(config["device"]).type == "cuda":
        bench.clock = synced_clock
    ids = bench.token_ids(tok, config["text"], T).to(model.tok_emb.weight.device)      # (T,)
    timing = dict(prefill=(f"1x{T}",), decode_batch=1, prompt_len=T, new_tokens=n, repeat=config["repeat"])
    print(f"speed, LoRA merged, median of {config['repeat']} runs each, dense and sparse interleaved:")
    print(bench.HEADER)
    return bench.bench_gates(model, timing, config["gates"], ids)


def suite(config, model, tok, name) -> dict:
    """--suite: speed, compute, quality and benchmarks of one sparse model (see the top)."""
    chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    tasks = [read_task(p) for p in task_paths(config["tasks"])] if config["tasks"] else []
    out = dict(model=name, ckpt=config["ckpt"] or None, gates=config["gates"], text=config["text"],
               seq_len=config["seq_len"], windows=len(chunks), route=model.cfg.route, kv=model.cfg.kv)
    with gates_as(model, chunks, config["seq_len"], config["gates"], config["path"], config["batch_size"],
                  config["seed"], config["target_compute"]) as path:
        quality = compare_dense(model, chunks, config["seq_len"], config["batch_size"], path)
        for key in ("sparse_s", "dense_s", "speedup"):   # the eval loop's seconds: the speed is timed below
            del quality[key]
        out.update(path=path, **quality)
        out["perplexity_ratio"] = out["perplexity"] / out["dense_perplexity"]
        out["tasks"] = [benchmark(model, tok, t, config["limit"], config["requests_per_batch"],
                                  config["max_new_tokens"], ("dense", "sparse"), path)
                        for t in tqdm(tasks, desc="tasks")]
        out["prefill"], out["decode"] = speed(model, tok, config) if config["gates"] != "peek" else (None, None)
    for mode in ("prefill", "decode"):                 # peek gates compute f(x) to decide: nothing to time
        out[f"{mode}_speedup"] = out[mode]["speedup"] if out[mode] else None
    out["repeat"] = config["repeat"]
    return out


def pm(row, key) -> str:
    return f"{row[key]:.3f} ± {row[key + '_stderr']:.3f}"


def suite_table(r) -> str:
    """The suite's result as a Markdown table, one row per metric: dense | sparse | sparse vs dense."""
    lines = [f"| metric | dense | sparse ({r['gates']} gates) | sparse vs dense |", "|---|---|---|---|"]
    for mode in ("prefill", "decode"):
        b = r[mode]
        if b is None:
            lines.append(f"| {mode} seconds | – | – | not timed: peek gates compute f(x) to decide, "
                         "they save nothing |")
            continue
        what = (f"prefill 1 x {b['seq_len']} tokens" if mode == "prefill"
                else f"decode {b['new_tokens']} tokens after {b['seq_len'] - b['new_tokens']}")
        lines.append(f"| {what}, seconds (LoRA merged; median of {r['repeat']}) | {b['dense_s']:.4f} | "
                     f"{b['sparse_s']:.4f} | speedup {b['speedup']:.2f}x (FLOP model: {b['ideal_speedup']:.2f}x) |")
    lines += [f"| compute ratio ({r['seq_len']}-token windows of the text) | 1 | {r['compute_ratio']:.3f} | "
              f"{1 - r['compute_ratio']:.1%} fewer FLOPs per token |",
              f"| density attn / mlp | 1 / 1 | {r['density_attn']:.3f} / {r['density_mlp']:.3f} | |",
              f"| perplexity ({r['tokens']} tokens) | {r['dense_perplexity']:.3f} | {r['perplexity']:.3f} | "
              f"{r['perplexity_ratio']:.3f}x |",
              f"| KL(dense ‖ sparse) per token | 0 | {r['kl_to_dense']:.4f} | |",
              f"| top-1 agreement with dense | 1 | {r['top1_agreement']:.3f} | |"]
    for t in r["tasks"]:
        compute = f", sparse compute ratio {t['compute_ratio_sparse']:.3f}" if "compute_ratio_sparse" in t else ""
        for metric in ("acc", "acc_norm", "exact_match"):
            if f"{metric}_dense" in t:
                chance = f", chance {t['chance']:.3f}" if metric != "exact_match" else ""
                delta = t[f"{metric}_sparse"] - t[f"{metric}_dense"]
                lines.append(f"| {t['task']} {metric} (n={t['examples']}{chance}{compute}) | "
                             f"{pm(t, f'{metric}_dense')} | {pm(t, f'{metric}_sparse')} | {delta:+.3f} |")
    return "\n".join(lines)


def main_suite(config, model, tok, name) -> dict:
    out = suite(config, model, tok, name)
    print(f"{name}, {config['ckpt'] or 'no checkpoint'}: {out['windows']} windows of {out['seq_len']} tokens "
          f"of {config['text']}" + (f", first {config['limit'] or 'all'} examples per task" if out["tasks"] else ""))
    print(suite_table(out))
    return out


def main_study(config, model, tok, name) -> dict:
    """--by_class / --by_position: what skips, as tables (and with --plot, a heatmap)."""
    chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    classes = skips.window_classes(tok, chunks, tok.adds_bos) if config["by_class"] else None
    with gates_as(model, chunks, config["seq_len"], config["gates"], config["path"], config["batch_size"],
                  config["seed"], config["target_compute"]) as path:
        found = skips.study(model, chunks, classes, config["batch_size"], path)
    if not config["by_position"]:
        del found["positions"]
    out = dict(model=name, ckpt=config["ckpt"] or None, gates=config["gates"], path=path, text=config["text"],
               seq_len=config["seq_len"], windows=len(chunks), **found)
    print(f"{name}, gates {config['gates']}: {len(chunks)} windows of {config['seq_len']} tokens")
    groups = [(title, out[key]) for key, title in (("classes", "token class"), ("positions", "position in the window"))
              if key in out]
    for title, rows in groups:
        print(skips.table(rows, title))
    if config["plot"]:
        title = f"{name}: where it skips ({config['gates']} gates, {config['seq_len']}-token windows)"
        write_plot(config["plot"], skips.heatmap_svg(groups, model.cfg.n_layers, title))
    return out


# ----------------------------------------------------------------------------------------------

def check(config):
    if not config["text"] and not config["tasks"]:
        raise ValueError("nothing to score: pass --text=FILE (perplexity) or --tasks=DIR (benchmarks)")
    check_ranges(config, RANGES)
    if config["tasks"] and config["gates"] == "random" and not (config["ckpt"] and config["text"]):
        raise ValueError("--tasks with --gates=random needs --ckpt and --text=FILE, the text on which the "
                         "learned gates' densities are measured")
    if config["tasks"] and config["gates"] == "peek" and not config["text"]:
        raise ValueError("--tasks with --gates=peek needs --text=FILE, the text on which the threshold for "
                         "--target_compute is chosen")
    study = config["by_class"] or config["by_position"]
    if (config["suite"] or study) and not config["text"]:
        raise ValueError(f"--{'suite' if config['suite'] else 'by_class/--by_position'} needs --text=FILE")
    if config["suite"] and study:
        raise ValueError("--suite and --by_class/--by_position are separate runs: pass one of them")
    if study and config["tasks"]:
        raise ValueError("--by_class/--by_position study --text, not benchmarks: drop --tasks")
    if config["suite"] and not config["ckpt"] and config["gates"] != "peek":
        raise ValueError("--suite compares a sparse checkpoint with its base: pass --ckpt=OUT_DIR "
                         "(or --gates=peek for the training-free reference on --init)")
    if config["path"] not in ("compact", "masked"):
        raise ValueError(f"--path must be compact or masked, got {config['path']!r}")
    if config["gates"] not in ("learned", "random", "open", "peek"):
        raise ValueError(f"--gates must be learned, random, open or peek, got {config['gates']!r}")
    if config["plot"] and not (config["ckpt"] or study):
        raise ValueError("--plot draws the densities of a sparse model: pass --ckpt=OUT_DIR too")
    if torch.device(config["device"]).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={config['device']} but no CUDA GPU is visible: use --device=cpu")


def write_plot(path, svg: str):
    try:
        with open(path, "w") as f:
            f.write(svg)
    except OSError as e:
        raise ValueError(f"cannot write --plot={path} ({e}): pick a writable path") from None
    print(f"wrote {path}")


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --text={path} ({e}): pass a UTF-8 text file") from None


def draw_frontier(pattern: str, plot: str):
    """--frontier: one picture of eval.py --json results, perplexity ratio vs compute ratio."""
    files = sorted(f for p in pattern.split(",") if p for f in glob.glob(p))
    if not files or not plot:
        raise ValueError(f"--frontier={pattern} needs result files that exist and a --plot=FILE.svg to draw into")
    rows = [json.loads(open(f).read().strip().splitlines()[-1]) for f in files]
    with open(plot, "w") as f:
        f.write(frontier_svg(rows, f"{rows[0]['model']}: quality against compute"))
    print(f"wrote {plot} from {len(rows)} results")


def main(argv):
    given = overrides(DEFAULTS, argv)
    config = dict(DEFAULTS, **given)
    if config["frontier"]:
        return draw_frontier(config["frontier"], config["plot"])
    check(config)
    if config["ckpt"]:   # --init, when given, says where the checkpoint's base model is now
        model, tok, meta = load_weights.load_sparse(config["ckpt"], config["dtype"], config["device"],
                                                    given.get("init"))
        name = given.get("init", meta["base"])
    else:
        model, tok = load_weights.load(config["init"], config["dtype"], config["device"])
        name = config["init"]
        if config["gates"] == "peek":                  # the reference needs a gate on every sublayer
            router.add_routers(model)
    mode = (main_suite if config["suite"] else main_study if config["by_class"] or config["by_position"]
            else main_benchmarks if config["tasks"] else None)
    if mode is not None:
        out = mode(config, model, tok, name)
        if config["json"]:
            print(json.dumps(out))
        return
    chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    out = dict(model=name, ckpt=config["ckpt"] or None, text=config["text"], seq_len=config["seq_len"],
               windows=len(chunks), bos=tok.adds_bos)
    print(f"{name}: {len(chunks)} windows of {config['seq_len']} tokens{' + BOS' if tok.adds_bos else ''}")
    if not config["ckpt"] and config["gates"] != "peek":
        sums, stats = evaluate(model, chunks, config["batch_size"])
        n = sums["tokens"]
        out.update(perplexity=math.exp(sums["nll"] / n), nll=sums["nll"] / n, tokens=int(n), seconds=sums["model_s"])
        print(f"perplexity {out['perplexity']:.4f} over {out['tokens']} scored tokens")
        if router.routers(model):   # an exported sparse folder: its routers decided
            L = model.cfg.n_layers
            out.update(route=model.cfg.route, kv=model.cfg.kv, density=stats.mean(n_layers=L),
                       density_attn=stats.mean("attn", n_layers=L), density_mlp=stats.mean("mlp", n_layers=L),
                       compute_ratio=compute_ratio(model.cfg, config["seq_len"], stats.density()))
            print(f"density {out['density']:.3f} (attn {out['density_attn']:.3f}, mlp {out['density_mlp']:.3f}), "
                  f"compute ratio {out['compute_ratio']:.3f}")
    else:
        path = "masked" if config["gates"] == "peek" else config["path"]         # peek decides from f(x)
        out.update(path=path, gates=config["gates"], route=model.cfg.route, kv=model.cfg.kv,
                   method=method(meta.get("train_config", {}) if config["ckpt"] else {}, config["gates"]))
        out.update(evaluate_sparse(model, chunks, config["seq_len"], config["batch_size"], config["path"], config["gates"],
                                   config["seed"], config["target_compute"]))
        print(f"perplexity {out['perplexity']:.4f} (dense {out['dense_perplexity']:.4f}) over {out['tokens']} "
              f"scored tokens; KL to dense {out['kl_to_dense']:.4f}; top-1 agreement {out['top1_agreement']:.1%}")
        print(f"gates {config['gates']}, path {path}: density {out['density']:.3f} (attn "
              f"{out['density_attn']:.3f}, mlp {out['density_mlp']:.3f}), compute ratio {out['compute_ratio']:.3f}")
        print(f"sparse pass {out['sparse_s']:.2f} s, dense pass {out['dense_s']:.2f} s, "
              f"speedup {out['speedup']:.2f}x")
        if config["plot"]:
            title = f"{name}: density {out['density']:.2f}, compute ratio {out['compute_ratio']:.2f}"
            write_plot(config["plot"], density_svg(out["per_layer"], title))
    if config["json"]:
        print(json.dumps(out))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:        # load_weights.LoadError is one: a problem the user can fix
        sys.exit(f"error: {e}")
