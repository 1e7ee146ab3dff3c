"""scoring.py — perplexity, and what sparsity costs against the dense model, on windows of a text.

One convention, so numbers compare across the repository's tools (evaluate.py, train.py's
held-out eval, export.py's card, research/):
- tokenize the whole text without special tokens and cut it into consecutive windows of
  seq_len tokens, dropping the incomplete tail;
- prepend BOS to each window exactly when the tokenizer's own post-processor adds one
  (Gemma's does, SmolLM2's does not): the model sees text the way it was trained to
  (data/prepare.py; train.py's windows follow the same convention);
- score every token that has a predecessor in its window: seq_len per window with BOS,
  seq_len - 1 without;
- perplexity = exp(mean negative log-likelihood over the scored tokens).

    chunks = windows(tok, read_text("val.txt"), 512)          # (N, L) token ids
    sums, stats = evaluate(model, chunks)                     # NLL sums, router.GateStats
    compare_dense(model, chunks, 512)                         # sparse vs its dense base: a dict

compare_dense is the sparse model against its base model (LoRA off, every gate open) on the
same windows: perplexity of both, mean KL(p_dense || p_sparse) over scored tokens, top-1
agreement, density (a sublayer without a router counts as computed) per layer, per kind and
overall, the compute ratio of the FLOP model (flops.compute_ratio), and the wall-clock seconds
of the sparse and the dense pass.
"""
import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm import tqdm

import load_weights
import lora
import router
from checkpoint import load_sparse
from configurator import overrides
from data.prepare import consecutive_windows, load_sources, spread_windows, tokenizer_key
from flops import compute_ratio

HEAD_ROWS = 256   # logits made this many tokens at a time: (rows, V) float32, not (B*T, V)


def windows(tok, text: str, seq_len: int, max_chunks: int = 0) -> torch.Tensor:
    """The text as (N, seq_len [+ 1 with BOS]) token ids, following the convention on top."""
    bos = tok.bos_id if tok.adds_bos else None
    return consecutive_windows(tok.encode(text, special=False), seq_len, bos, max_chunks)


def fit_and_text_windows(tok, config) -> tuple:
    """The two texts of the research probes that fit on one and measure on the other:
    (config["fit_windows"] windows of the corpus config["data"], spread over its files as
    train.py's held-out windows are; config["windows"] windows of config["text"])."""
    bos = tok.bos_id if tok.adds_bos else None
    sources = load_sources(config["data"], tok, tokenizer_key(load_weights.resolve(config["init"])))
    return (spread_windows(sources, config["seq_len"], bos, config["fit_windows"]),
            windows(tok, read_text(config["text"]), config["seq_len"], config["windows"]))


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


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --text={path} ({e}): pass a UTF-8 text file") from None


GATES_METHOD = {"learned": "routed (ours)", "random": "random gates", "peek": "peek rule", "open": "LoRA only",
                "peek_lora": "peek rule, LoRA on"}
STATIC_METHOD = {"kl": "static sublayers, KL", "bi": "static sublayers, BI", "layer": "static blocks (ShortGPT)"}


def method(train_config: dict, gates: str) -> str:
    """What made a result's skips, as the frontier plot and the tables name it: the gates, or
    for a checkpoint's own gates how it was trained (a static baseline, a route, a kv mode),
    and what its skips add (router.Substitute) when that is not 0."""
    rank = train_config.get("substitute")
    adds = "" if rank is None else ", mean substitute" if rank == 0 else f", rank-{rank} substitutes"
    if gates != "learned":
        return GATES_METHOD[gates] + adds
    if train_config.get("prune"):
        return STATIC_METHOD[train_config["prune"]] + (" + routed" if train_config.get("prune_routed") else "") + adds
    variants = [f"{k}={train_config[k]}" for k, plain in (("route", "sublayer"), ("kv", "all"))
                if train_config.get(k, plain) != plain]
    return ("routed, " + ", ".join(variants) if variants else GATES_METHOD["learned"]) + adds


# ----------------------------------------------------------------------------------------------
# The command line that evaluate.py and research/ share
# ----------------------------------------------------------------------------------------------

def check_gates(config):
    """The flags every research command shares with evaluate.py: --path, --gates, --device."""
    if config["path"] not in ("compact", "masked"):
        raise ValueError(f"--path must be compact or masked, got {config['path']!r}")
    if config["gates"] not in GATES_METHOD:
        raise ValueError(f"--gates must be learned, random, open, peek or peek_lora, got {config['gates']!r}")
    if config["gates"] == "peek_lora" and not config["ckpt"]:
        raise ValueError("--gates=peek_lora runs the peek rule on a checkpoint's trained adapters: pass --ckpt")
    load_weights.check_device(config["device"])


def check_compares_a_checkpoint(config, command: str = ""):
    """--gates=random or open and --path=masked compare a checkpoint with its dense base: without
    --ckpt a command that scores the --init model as it is would ignore them (research.studies,
    which studies an exported folder's own gates on either path, does not call this)."""
    if not config["ckpt"] and (config["gates"] in ("random", "open") or config["path"] == "masked"):
        what = "--path=masked" if config["path"] == "masked" else f"--gates={config['gates']}"
        raise ValueError(f"{command}{what} compares a checkpoint with its dense base: pass --ckpt=DIR (without "
                         "it, the --init model is scored as it is)")


def research_main(defaults: dict, check, work):
    """The main(argv) of a research command: the flags over defaults, check(config), the model
    (load_model), then out = work(config, model, tok, name), printed as JSON with --json."""
    def main(argv):
        given = overrides(defaults, argv)
        config = dict(defaults, **given)
        check(config)
        model, tok, name, _ = load_model(config, given)
        out = work(config, model, tok, name)
        if config["json"]:
            print(json.dumps(out))
    return main


def load_model(config, given):
    """(model, tokenizer, name, checkpoint meta or {}) as --init, --ckpt and --gates ask."""
    if config["ckpt"]:   # --init, when given, says where the checkpoint's base model is now
        model, tok, meta = load_sparse(config["ckpt"], config["dtype"], config["device"], given.get("init"))
        return model, tok, given.get("init", meta["base"]), meta
    model, tok = load_weights.load(config["init"], config["dtype"], config["device"])
    if config["gates"] == "peek":                  # the reference needs a gate on every sublayer
        router.add_routers(model)
    return model, tok, config["init"], {}
