"""bench.py — wall-clock of the sparse (compacted) path against the dense path of the same code.

    python bench.py --json                  # SmolLM2-135M-Instruct (the Hub's weights on first use), float32
    python bench.py --repeat=1 --densities=0.5 --kv=all \\
        --prefill=1x256 --prompt_len=128 --new_tokens=16                        # a quick look
    python bench.py --ckpt=out/smol         # its base model, plus the learned gates of this train.py checkpoint
    python bench.py --init=sparse-model/    # a folder export.py wrote: random gates, then its learned ones
    python bench.py --init=checkpoints/smollm2-135m-instruct --dtype=bfloat16 --load_rss   # loading's memory
    python bench.py --init=llama-3.1-8b --random_weights=True --device=cuda --dtype=bfloat16  # a GPU, no download
    python bench.py --compile=True --densities=1,0.5,0.25 --kv=all    # compiled.py: decoding steps, compiled rows

Both paths run in the same process on the same weights: the dense path is
model(idx, routers_off=True), the sparse path is the compacted default, where a skipped
sublayer is not computed. The gates are forced: `gates.forced(model, density)` makes every
router keep a random share = density of the tokens, so the speed of compaction is measured
apart from what a trained router decides. With --ckpt the checkpoint's learned gates run
too (LoRA merged into the weights first, so that adapters cost nothing in either path).

Measured, for each kv mode and density (timing.py, which `python -m research.suite` shares):
- prefill: one forward over (batch x seq_len) tokens, logits at every position;
- decode:  new_tokens greedy steps of one token through a KV cache after a prompt of
           prompt_len tokens (the prefill is not timed).
Each row gives the measured density, dense_s and sparse_s (medians over --repeat runs,
dense and sparse interleaved so that a noisy neighbour hits both), speedup = dense_s /
sparse_s, ideal_speedup = 1 / flops.compute_ratio at the measured per-sublayer densities
and the real context, and efficiency = speedup / ideal_speedup (1 = every skipped FLOP
turned into saved time).

Our dense model against transformers' on the same folder: `python -m research.vs_hf --init=...`.

--compile=True runs both paths through compiled.py: every decoding step of batch 1 as its
compiled step, and every prefill with each block's MLP compiled on its rows (the row count a
dynamic size: one graph for every kept count). The first rows compare the dense model eager
(dense_s) against compiled (sparse_s), prefill and decoding. The untimed first run of each path
compiles what it meets (minutes on a CPU).

--capacity=eager runs both paths' prefills through capacity.py: each routed sublayer at a
capacity fixed before the call, from the kept counts of the calls before, so that nothing is
read back from a GPU until the call ends (the same logits). --capacity=graph (CUDA) also
replays each prefill, dense and sparse, as one CUDA graph; --capacity=compiled runs each
through torch.compile (a compile per density: minutes), and compiled-graph does both. Decoding
steps of batch 1 run as without it.

--random_weights builds a preset's architecture with random weights on --device instead of
loading it (nothing is downloaded): the gates are forced, so the speed of either path does not
depend on the weights' values, and the token ids are random too. On a GPU the clock waits for
the device (torch.cuda.synchronize) before every reading.

--load_rss measures loading instead (Linux): a fresh process loads the weights in --dtype and reads
each of them once, and the row gives its peak resident memory above what it held before the load
(torch, and its ~70 MB of one-time imports on the first model built), against the weights' size.

Timings on a shared CPU are noisy: read the ratios, and keep --threads at what you deploy.
OpenMP's wait policy is left as sample.py runs with it (OMP_WAIT_POLICY unset: idle workers spin
a while before they sleep). On a machine where other processes keep the cores busy, export
OMP_WAIT_POLICY=PASSIVE: then no worker spins on a core another process wants, but every op that
OpenMP splits pays ~0.1 ms to wake its workers, which the compacted paths' small ops feel most.
glibc's allocator gives large freed blocks back to the kernel, and the next prefill faults them in
again page by page: MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 in the
environment keeps them, and made a 512-token prefill 5-6 % faster here (decoding did not change;
RESULTS.md, "glibc's allocator"). The first line names any such setting a run had.
Every option below is --key=value or --key value (python bench.py --help lists them).
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

import load_weights
import lora
import router
from checkpoint import load_sparse, read_checkpoint_meta
from configurator import AT_LEAST_0, AT_LEAST_1, Range, check_ranges, overrides, run_main
from capacity import Capacity, check_mode
from compiled import Compiled
from gates import forced
from model import PRESETS, Model, ModelConfig
from timing import HEADER, bench_gates, compiled_rows, make_clock, parse_shape, token_ids, where

DEFAULTS = dict(
    init="smollm2-135m-instruct",     # base model: a preset name or a Hugging Face folder
    ckpt="",                          # a train.py out_dir: also bench its learned gates
    text="data/heldout/python_docs.txt",           # where the token ids come from
    densities=(1.0, 0.75, 0.5, 0.25), # forced random gates: P(keep) of every router
    kv=("all", "kept"),               # kv modes of the random gates
    route="sublayer",                 # what gets a router (router.ROUTES) for the random gates
    substitute=None,                  # ... and what their skips add (router.Substitute): None = 0, r = rank r
    prefill=("1x1024", "4x256"),      # prefill shapes, BATCHxSEQ_LEN
    prompt_len=512,                   # decode: prompt tokens, then
    new_tokens=128,                   # ... this many greedy steps, timed
    decode_batch=1,
    repeat=3,                         # timed runs per path; the median is reported
    threads=2,                        # torch.set_num_threads
    dtype="float32",
    seed=0,
    clock="wall",                     # wall | cpu (process CPU seconds: steadier on a shared machine)
    device="cpu",                     # cpu | cuda | cuda:1 ...
    random_weights=False,             # --init is a preset: its shapes, random weights, no download
    load_rss=False,                   # measure the peak memory of loading the model instead
    compile=False,                    # compiled.py: decode batch 1 as its compiled step, prefill with compiled rows
    capacity="",                      # capacity.py: prefills at fixed capacities, one of capacity.MODES
    json=False,                       # print the rows as one JSON list on the last line
)
RANGES = dict(densities=Range(0, 1, open_lo=True), prompt_len=AT_LEAST_1, new_tokens=AT_LEAST_1,
              decode_batch=AT_LEAST_1, repeat=AT_LEAST_1, threads=AT_LEAST_1, seed=AT_LEAST_0)


# ----------------------------------------------------------------------------------------------
# --random_weights: no folder, no tokenizer
# ----------------------------------------------------------------------------------------------

def random_ids(vocab_size: int, n: int) -> torch.Tensor:
    """n random token ids (--random_weights: no tokenizer), as (n,)."""
    return torch.randint(0, vocab_size, (n,))


def random_model(name: str, dtype: str, device: str) -> Model:
    """A preset's architecture with random weights, built on the device (no download)."""
    with torch.device(device):
        model = Model(ModelConfig(**PRESETS[name]))                      # default init, float32
    return model.to(load_weights.DTYPES[dtype])


# ----------------------------------------------------------------------------------------------
# Loading's peak memory
# ----------------------------------------------------------------------------------------------

LOAD_RSS = """
import json, resource, sys
import torch
import load_weights

def resident():                                       # bytes resident now
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

folder, dtype = load_weights.resolve(sys.argv[1]), load_weights.DTYPES[sys.argv[2]]
with torch.device("meta"):
    load_weights.Model(load_weights.read_config(folder))   # torch's one-time imports, no weights
before = resident()
model = load_weights.load_model(folder, dtype)
with torch.no_grad():
    for p in model.parameters():
        p.sum()        # every weight read once: a view of a file's memory map is read on first use
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: kilobytes
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(before=before, peak=peak, weights=weights)))
"""


def bench_load(base: str, dtype: str) -> dict:
    """Peak resident memory of loading base in dtype, in a fresh process (this one may hold a
    model already), above the memory it held before, against the weights' size."""
    if not Path("/proc/self/status").is_file():
        raise ValueError("--load_rss reads /proc/self/status, which only Linux has")
    folder = load_weights.resolve(base)
    child = subprocess.run([sys.executable, "-c", LOAD_RSS, str(folder), dtype], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent)
    if child.returncode != 0:
        raise ValueError(f"loading {folder} in a fresh process failed: {child.stderr.strip()[-500:]}")
    m = json.loads(child.stdout.splitlines()[-1])
    mb = 2 ** 20
    r = dict(mode="load", dtype=dtype, weights_mb=m["weights"] / mb,
             disk_mb=sum(f.stat().st_size for f in load_weights.weight_files(folder)) / mb,
             before_mb=m["before"] / mb, peak_mb=m["peak"] / mb, ratio=(m["peak"] - m["before"]) / m["weights"])
    print(f"load     {dtype}: weights {r['weights_mb']:.0f} MB ({r['disk_mb']:.0f} MB on disk), peak resident "
          f"{r['peak_mb']:.0f} MB, {r['before_mb']:.0f} MB before loading: {r['ratio']:.2f}x the weights")
    return r


# ----------------------------------------------------------------------------------------------

def check(config):
    check_ranges(config, RANGES)
    for kv in config["kv"]:
        if kv not in router.KV_MODES:
            raise ValueError(f"--kv: unknown mode {kv!r}; choose from {', '.join(router.KV_MODES)}")
    if config["clock"] not in ("wall", "cpu"):
        raise ValueError(f"--clock={config['clock']}: choose wall or cpu")
    if config["clock"] == "cpu" and config["device"] != "cpu":
        raise ValueError(f"--clock=cpu counts this process's CPU time, not --device={config['device']}'s: use --clock=wall")
    if config["random_weights"]:
        if config["init"] not in PRESETS:
            raise ValueError(f"--random_weights builds a preset's shapes: --init={config['init']} is not one of "
                             f"{', '.join(PRESETS)}")
        if config["ckpt"] or config["load_rss"]:
            raise ValueError("--random_weights times the forced gates only: drop --ckpt and --load_rss")
    if config["route"] not in router.ROUTES:
        raise ValueError(f"--route: unknown route {config['route']!r}; choose from {', '.join(router.ROUTES)}")
    for spec in config["prefill"]:
        parse_shape(spec)
    check_mode(config["capacity"], config["device"])
    if config["capacity"] and config["compile"]:
        raise ValueError("--capacity and --compile are two ways to run a prefill: choose one")
    if config["compile"] and config["decode_batch"] != 1:
        raise ValueError("--compile compiles the decoding step of batch 1: use --decode_batch=1")


def check_context(model, config):
    longest = max([parse_shape(s)[1] for s in config["prefill"]] + [config["prompt_len"] + config["new_tokens"]])
    if longest > model.cfg.max_seq_len:
        raise ValueError(f"{longest} tokens exceed the model's context of {model.cfg.max_seq_len}: "
                         "lower --prefill, --prompt_len or --new_tokens")


def bench_all(model, base, config, ids, clock) -> list:
    """The rows of the random gates at every kv mode and density, then of the learned gates
    (--ckpt, or a folder export.py wrote)."""
    device = config["device"]
    exported = bool(router.routers(model))          # a folder export.py wrote: it has learned gates
    def runner(m):    # the model, its compiled step, or its fixed-capacity prefills
        if config["capacity"]:
            return Capacity.for_mode(m, config["capacity"])
        return Compiled(m) if config["compile"] else m
    run = runner(model)
    print(HEADER)
    rows = compiled_rows(model, run, config, ids, clock) if config["compile"] else []
    for kv in config["kv"]:
        router.add_routers(model, config["route"], kv, substitute=config["substitute"])
        for density in config["densities"]:
            with forced(model, density):
                rows += bench_gates(run, config, "random", ids, clock)
    if config["ckpt"]:
        model, tok, meta = load_sparse(config["ckpt"], config["dtype"], device, base=base)
        lora.merge(model)                        # W += scale * B A: adapters cost nothing
        print(f"learned gates of {config['ckpt']} (LoRA merged into the weights)")
        rows += bench_gates(runner(model), config, "learned", ids, clock)
    elif exported:                               # the random gates replaced its routers: reload
        model, tok = load_weights.load(base, config["dtype"], device)
        print(f"learned gates of {base} (exported, LoRA merged)")
        rows += bench_gates(runner(model), config, "learned", ids, clock)
    return rows


def main(argv):
    given = overrides(DEFAULTS, argv)
    config = dict(DEFAULTS, **given)
    check(config)
    torch.set_num_threads(config["threads"])
    clock = make_clock(config["clock"], config["device"])    # on a GPU: waits for its queued work
    torch.manual_seed(config["seed"])
    base = config["init"]
    if config["ckpt"] and "init" not in given:     # --init, when given, says where the checkpoint's base is now
        base = read_checkpoint_meta(config["ckpt"])["base"]
    if config["load_rss"]:
        rows = [bench_load(base, config["dtype"])]
        if config["json"]:
            print(json.dumps(rows))
        return
    device = config["device"]
    if config["random_weights"]:
        model, tok = random_model(base, config["dtype"], device), None
    else:
        model, tok = load_weights.load(base, config["dtype"], device)
    model.requires_grad_(False).eval()
    check_context(model, config)
    need = max([b * t for b, t in map(parse_shape, config["prefill"])]
               + [config["decode_batch"] * config["prompt_len"]])
    ids = (random_ids(model.cfg.vocab_size, need) if tok is None else token_ids(tok, config["text"], need)).to(device)
    print(f"{base}{' (random weights)' if tok is None else ''}: {config['dtype']}, "
          f"{where(device, config['threads'])}, "
          f"{config['clock']} clock, median of {config['repeat']}")
    rows = bench_all(model, base, config, ids, clock)
    if config["json"]:
        print(json.dumps(rows))


if __name__ == "__main__":
    run_main(main)
