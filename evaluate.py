"""evaluate.py — perplexity of a model on a text file; for a sparse checkpoint, what sparsity cost.

    python evaluate.py --init=smollm2-135m-instruct --text=val.txt --seq_len=512
    python evaluate.py --ckpt=out/smol --text=val.txt --json > r.json
    python -m research.plots --density=r.json --plot=density.svg      # its density per layer
    python evaluate.py --ckpt=out/smol --text=val.txt --gates=random   # baseline: same densities, random tokens
    python evaluate.py --init=sparse-model/ --text=val.txt             # a folder export.py wrote

One convention, so numbers compare across the repository's tools (scoring.py spells it out):
the whole text is tokenized without special tokens and cut into consecutive windows of seq_len
tokens (the incomplete tail dropped), BOS prepended exactly when the tokenizer's own
post-processor adds one (Gemma's does, SmolLM2's does not), every token with a predecessor in
its window scored, and perplexity = exp(mean negative log-likelihood over the scored tokens).

With --ckpt the sparse model is compared with its base model (LoRA off, every gate open) on the
same windows (scoring.compare_dense): perplexity of both, mean KL(p_dense || p_sparse) over
scored tokens, top-1 agreement, density (fraction of (token, sublayer) slots computed; a
sublayer without a router counts as computed) per layer, per kind and overall, the compute ratio
of the FLOP model (flops.compute_ratio), and the wall-clock seconds of the sparse and the dense
pass. --gates picks what decides the skips (gates.py forces the baselines onto the model):
  learned  the checkpoint's routers (default);
  random   every router keeps a random share of tokens equal to the density its learned gates
           show on this same text: the baseline a learned router has to beat;
  open     every gate open, LoRA on: what the adapters alone do;
  peek     the training-free reference: the base weights (LoRA off, routers ignored), and a
           token computes a sublayer iff |f(x) - s(x)| / |h| (s: the checkpoint's skip
           substitute, or 0) per FLOP a skip there saves is above one global threshold, chosen so that the compute ratio on this text is
           --target_compute (+-0.004). It computes f(x) to decide, so it saves nothing: it
           shows how good per-token decisions can be before any training. Without --ckpt it
           attaches routers to every sublayer of the --init model.
  peek_lora  the peek rule on the trained model (LoRA on, --ckpt): how far the learned routers'
           choices are from the rule's, on the weights they were trained with.
A folder written by export.py (--init) is the sparse model with no base beside it: its
perplexity, density and compute ratio, nothing compared with a dense model.
--path=masked runs the training path (every token computes, the gate multiplies) instead of
the compacted one; both must give the same numbers.
--compile=True runs the passes (sparse and dense, or the model alone) through compiled.py: the
compacted path with each block's MLP compiled on its rows (one graph for every kept count). The
numbers are the eager ones (within float rounding). The compiling (minutes on a CPU) happens in
the untimed warm-up on the first window when sparse and dense passes are compared, and inside the
timed first window for a model alone. It runs the compacted path only: not with --path=masked or
--gates=peek(_lora).
--capacity=eager runs them through capacity.py instead: every routed sublayer at a capacity fixed
from the windows before, nothing read back from a GPU until a pass ends (the same numbers);
--capacity=graph (CUDA) also replays each pass as one CUDA graph, compiled runs it through
torch.compile, compiled-graph both. For a GPU: on a CPU the exact compacted path is faster.

Beyond perplexity, in research/ (python -m research.NAME, the same flags where they apply):
research.plots draws a --json result's density per layer (--density=r.json) and the frontier
of many results; research.tasks scores BIG-bench tasks; research.suite is one table of speed,
compute, quality and benchmarks for one checkpoint; research.studies shows what skips.

Every option below is --key=value or --key value (python evaluate.py --help lists them). --json
prints the results as one JSON object on the last line.
"""
import json
import math

import router
from capacity import Capacity, check_mode
from compiled import Compiled
from configurator import AT_LEAST_0, AT_LEAST_1, Range, check_ranges, overrides, run_main
from flops import compute_ratio
from gates import PEEK, evaluate_sparse
from scoring import check_compares_a_checkpoint, check_gates, evaluate, load_model, method, read_text, windows

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
    gates="learned",                # --ckpt: learned | random | open | peek | peek_lora (see above)
    target_compute=0.9,             # --gates=peek: the compute ratio its threshold aims at
    seed=1337,                      # for --gates=random
    compile=False,                  # run the passes through compiled.py (see above; compiling takes minutes on a CPU)
    capacity="",                    # run the passes through capacity.py: one of capacity.MODES; see above
    json=False,                     # print the results as one JSON object on the last line
)
RANGES = dict(seq_len=AT_LEAST_1, batch_size=AT_LEAST_1, max_chunks=AT_LEAST_0, seed=AT_LEAST_0,
              target_compute=Range(0, 1, open_lo=True))


def check(config):
    if not config["text"]:
        raise ValueError("nothing to score: pass --text=FILE (benchmarks: python -m research.tasks --tasks=DIR)")
    check_ranges(config, RANGES)
    check_gates(config)
    check_compares_a_checkpoint(config)
    if config["compile"] and config["path"] == "masked":
        raise ValueError("--compile compiles the compacted path, not the masked (training) one: drop --path=masked")
    check_mode(config["capacity"], config["device"])
    if config["capacity"] and (config["compile"] or config["path"] == "masked" or config["gates"] in PEEK):
        raise ValueError("--capacity runs the compacted path at fixed capacities: drop --compile, --path=masked "
                         "and --gates=peek(_lora)")
    if config["compile"] and config["gates"] in PEEK:
        raise ValueError(f"--gates={config['gates']} decides from f(x) on the masked (training) path, which "
                         "--compile does not compile: drop --compile")


def perplexity(config, model, chunks, out: dict):
    """A model alone: its perplexity; an exported sparse folder also its density and compute ratio."""
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


def against_dense(config, model, chunks, meta, out: dict):
    """The sparse model under --gates against its dense base (gates.evaluate_sparse)."""
    path = "masked" if config["gates"] in PEEK else config["path"]         # peek decides from f(x)
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


def main(argv):
    given = overrides(DEFAULTS, argv)
    config = dict(DEFAULTS, **given)
    check(config)
    model, tok, name, meta = load_model(config, given)
    if config["compile"]:   # reads as the model (scoring.py and gates.py take it), its rows compiled
        model = Compiled(model)
    if config["capacity"]:  # reads as the model too, its passes at fixed capacities
        model = Capacity.for_mode(model, config["capacity"])
    chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    out = dict(model=name, ckpt=config["ckpt"] or None, text=config["text"], seq_len=config["seq_len"],
               windows=len(chunks), bos=tok.adds_bos)
    print(f"{name}: {len(chunks)} windows of {config['seq_len']} tokens{' + BOS' if tok.adds_bos else ''}")
    if not config["ckpt"] and config["gates"] != "peek":
        perplexity(config, model, chunks, out)
    else:
        against_dense(config, model, chunks, meta, out)
    if config["json"]:
        print(json.dumps(out))


if __name__ == "__main__":
    run_main(main)
