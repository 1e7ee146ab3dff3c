"""research/suite.py — one table for one sparse checkpoint: speed, compute, quality and benchmarks.

    python -m research.suite --ckpt=out/smol --text=data/heldout/python_docs.txt --json
    python -m research.suite --ckpt=out/smol --text=data/heldout/python_docs.txt \\
        --tasks=data/benchmarks/bigbench --limit=100
    python -m research.suite --init=checkpoints/smollm2-135m-instruct-f32 --gates=peek \\
        --text=data/heldout/python_docs.txt            # the training-free reference, no checkpoint

One row per metric, dense | sparse |
sparse vs dense, and its JSON:
- quality on --text as evaluate.py measures it (scoring.compare_dense under --gates, gates.py):
  perplexity of both and their ratio, KL, top-1 agreement, density, compute ratio; with --tasks
  every benchmark (research/tasks.py), dense vs sparse;
- speed, measured last, with bench.py's timing (timing.py): the LoRA adapters are merged into the
  weights first (so they cost nothing), and the model with its gates runs against the same model
  with routers off, in this process, interleaved: prefill of the text's first 1 x seq_len tokens,
  and --decode_tokens greedy KV-cached steps after a prompt of seq_len tokens; medians of --repeat
  runs; speedup = dense seconds / sparse seconds, beside the FLOP model's 1 / compute ratio. On a
  GPU the clock waits for its queued work before every reading (generate.now).
  Peek gates compute f(x) to decide, so they save nothing: they get no speed.

Every option below is --key=value or --key value (python -m research.suite --help lists them).
--json prints the results as one JSON object on the last line.
"""

from tqdm import tqdm

import lora
from configurator import AT_LEAST_0, AT_LEAST_1, Range, check_ranges, run_main
from gates import PEEK, gates_as
from research.tasks import benchmark, read_task, task_paths
from scoring import check_gates, compare_dense, read_text, research_main, windows
from timing import HEADER, bench_gates, make_clock, token_ids

DEFAULTS = dict(
    init="smollm2-135m-instruct",   # model: a preset name or a Hugging Face-format folder (with --ckpt: its base)
    ckpt="",                        # a train.py out_dir: its sparse model against its base
    text="",                        # the text file to score and time (hold it out of training)
    tasks="",                       # benchmarks too: a folder of BIG-bench task .json files, or files joined by ","
    seq_len=512,                    # window length in text tokens (BOS not counted); the timed prefill and prompt
    batch_size=4,                   # windows per forward pass
    max_chunks=0,                   # score only the first N windows; 0 = all
    limit=0,                        # benchmarks: the first N examples of each task; 0 = all
    requests_per_batch=16,          # benchmarks: (context, continuation) pairs or prompts per forward pass
    max_new_tokens=16,              # benchmarks: longest generated answer (exact match)
    repeat=3,                       # timed runs per path (the median is reported)
    decode_tokens=32,               # greedy steps timed after a prompt of seq_len tokens
    gates="learned",                # learned | random | open | peek | peek_lora (evaluate.py's)
    path="compact",                 # compact (skipped work removed) | masked (training path)
    target_compute=0.9,             # --gates=peek: the compute ratio its threshold aims at
    seed=1337,                      # for --gates=random
    dtype="float32",                # float32 | bfloat16 | float16
    device="cpu",                   # cpu | cuda | cuda:1 | mps
    json=False,                     # print the results as one JSON object on the last line
)
RANGES = dict(seq_len=AT_LEAST_1, batch_size=AT_LEAST_1, max_chunks=AT_LEAST_0, seed=AT_LEAST_0,
              target_compute=Range(0, 1, open_lo=True), limit=AT_LEAST_0, requests_per_batch=AT_LEAST_1,
              max_new_tokens=AT_LEAST_1, repeat=AT_LEAST_1, decode_tokens=AT_LEAST_1)


def speed(model, tok, config) -> list:
    """bench.py's [prefill row, decode row] for the model's gates as they are set now, after
    merging LoRA into the weights (for good: call it last). Dense = the same model, routers off."""
    T, n = config["seq_len"], config["decode_tokens"]
    if T + n > model.cfg.max_seq_len:
        raise ValueError(f"--seq_len={T} plus --decode_tokens={n} exceed the model's context of "
                         f"{model.cfg.max_seq_len}: lower one of them")
    lora.merge(model)                                  # W += scale * B A: adapters cost nothing
    clock = make_clock("wall", config["device"])       # on a GPU: waits for its queued work
    ids = token_ids(tok, config["text"], T).to(model.tok_emb.weight.device)      # (T,)
    plan = dict(prefill=(f"1x{T}",), decode_batch=1, prompt_len=T, new_tokens=n, repeat=config["repeat"])
    print(f"speed, LoRA merged, median of {config['repeat']} runs each, dense and sparse interleaved:")
    print(HEADER)
    return bench_gates(model, plan, config["gates"], ids, clock)


def suite(config, model, tok, name) -> dict:
    """Speed, compute, quality and benchmarks of one sparse model (see the top)."""
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
        out["prefill"], out["decode"] = speed(model, tok, config) if config["gates"] not in PEEK else (None, None)
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


def check(config):
    if not config["text"]:
        raise ValueError("research.suite needs --text=FILE, the text its quality and speed are measured on")
    check_ranges(config, RANGES)
    if not config["ckpt"] and config["gates"] != "peek":
        raise ValueError("research.suite compares a sparse checkpoint with its base: pass --ckpt=OUT_DIR "
                         "(or --gates=peek for the training-free reference on --init)")
    check_gates(config)


main = research_main(DEFAULTS, check, main_suite)


if __name__ == "__main__":
    run_main(main)
