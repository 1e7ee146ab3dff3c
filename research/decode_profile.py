"""research/decode_profile.py — where a decoding step of batch 1 spends its time, dense against sparse.

    python -m research.decode_profile        # SmolLM2-135M-Instruct: eager and compiled, densities 1 and 0.5
    python -m research.decode_profile --paths=eager --densities=0.5 --steps=32 --json

bench.py says how much faster a sparse decoding step is than a dense one; this says where the time
of each goes, so that a missed target (a density-1 step slower than the dense one, an efficiency
under 1) has a reason. For each path (`eager`: the model; `compiled`: compiled.Compiled) it
decodes --steps greedy tokens of batch 1 after a prompt of --prompt_len random token ids, with
routers on every sublayer (kv="all"), dense (routers off) and with random gates forced at each
density (gates.forced, as bench.py does). Per step, in milliseconds:

- wall: the median over --repeat runs, dense and sparse steps interleaved (timing.decode_runs),
  with the speedup, the ideal speedup of the FLOP model and the efficiency, as bench.py gives them;
- profiled: one more run of each under torch.profiler (which slows it), its self CPU time by class:
  - matmul: the projections' matrix products (aten's, or the calls inductor's code makes);
  - attention: scaled_dot_product_attention;
  - compiled kernels: inductor's fused kernels (norms, rotary embeddings, routers, additions) and
    its wrapper around them, the code of the compiled step that is not a matmul or attention
    (inductor is told to record its kernels and calls: torch._inductor.config.cpp.enable_kernel_profile);
  - compiled-call overhead: what a call of the compiled step costs before it runs: checking its
    guards (is the model still the one it was compiled for?), and preparing its inputs;
  - other ops: every other op, the eager path's norms, rotary embeddings, routers and additions;
  - outside ops: the rest, Python between ops (the gate records, the cache's bookkeeping).

Random weights would do as well (the gates are forced); the checkpoint's are loaded as bench.py
loads them. Every option below is --key=value or --key value (--help lists them); --json prints
the rows as one JSON list on the last line.
"""
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import load_weights
import router
from compiled import Compiled
from configurator import AT_LEAST_1, FRACTION, Range, check_ranges, overrides, run_main
from gates import forced
from timing import decode_runs, row, where

DEFAULTS = dict(
    init="checkpoints/smollm2-135m-instruct-f32",  # base model: preset name or HF-format folder
    densities=(1.0, 0.5),        # forced random gates: the share of tokens each sublayer computes
    paths=("eager", "compiled"),  # the model, and its compiled.Compiled (compiling takes minutes on a CPU)
    prompt_len=512,              # tokens in the cache before the first timed step
    steps=64,                    # decoded tokens per run
    repeat=3,                    # timed runs of the wall clock; the median is reported
    threads=2,                   # torch.set_num_threads
    seed=1337,
    dtype="float32",
    json=False,                  # print the rows as one JSON list on the last line
)
RANGES = dict(densities=FRACTION, prompt_len=AT_LEAST_1, steps=AT_LEAST_1, repeat=AT_LEAST_1,
              threads=AT_LEAST_1, seed=Range(0))
PATHS = ("eager", "compiled")
CLASSES = ("matmul", "attention", "compiled kernels", "compiled-call overhead", "other ops", "outside ops")
MATMUL = {"mm", "addmm", "bmm", "matmul", "linear", "addmv", "mv"}
# What torch.compile's runtime records around a compiled call, before or after its code runs
CALL_OVERHEAD = ("TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher", "Torch-Compiled Region")


def op_class(name: str):
    """The class of a profiler event's self time, by the event's name (None: not an op)."""
    if name.startswith("## Call CompiledFxGraph") or "cpp_fused" in name or name.startswith("triton_"):
        return "compiled kernels"        # the call, or one kernel (when inductor records each)
    if name.startswith(CALL_OVERHEAD):
        return "compiled-call overhead"
    for prefix in ("aten::", "aoti_torch_cpu_", "aoti_torch_cuda_"):
        if name.startswith(prefix):
            op = name[len(prefix):].removesuffix("_out").lstrip("_")
            if op in MATMUL:
                return "matmul"
            return "attention" if op.startswith("scaled_dot_product") else "other ops"
    return None


@torch.inference_mode()
def profiled_steps(model, prompt, steps: int, routers_off: bool) -> dict:
    """Greedy decoding of `steps` tokens after prompt (1, P) under the profiler (the prompt's
    prefill outside it): {class: self CPU ms per step}."""
    cache = model.new_cache(1, prompt.shape[1] + steps)
    logits, _ = model(prompt, cache=cache, routers_off=routers_off, last_only=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, routers_off=routers_off,
                              last_only=True)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    ms = defaultdict(float)
    for e in prof.key_averages():
        kind = op_class(e.key)
        if kind is not None:
            ms[kind] += e.self_cpu_time_total / 1e3 / steps
    ms["outside ops"] = max(0.0, wall - sum(ms.values()))
    return {k: ms[k] for k in CLASSES}


def profile_path(name: str, run, model, prompt, config) -> list:
    """The rows of one path (run: the model or its Compiled) at every density."""
    rows = []
    for density in config["densities"]:
        with forced(model, density):
            dense_s, sparse_s, records = decode_runs(run, prompt, config["steps"], config["repeat"])
            dense = profiled_steps(run, prompt, config["steps"], True)
            sparse = profiled_steps(run, prompt, config["steps"], False)
        r = row(model, "decode", "random", 1, prompt.shape[1] + config["steps"], config["steps"],
                dense_s, sparse_s, records)
        rows.append(dict(path=name, density=r["density"], dense_ms=1e3 * dense_s / config["steps"],
                         sparse_ms=1e3 * sparse_s / config["steps"], speedup=r["speedup"],
                         ideal_speedup=r["ideal_speedup"], efficiency=r["efficiency"],
                         profiled_dense=dense, profiled_sparse=sparse))
        report(rows[-1])
    return rows


def report(r: dict):
    print(f"\n{r['path']}, density {r['density']:.3f}: dense {r['dense_ms']:.2f} ms a step, sparse "
          f"{r['sparse_ms']:.2f} ms: speedup {r['speedup']:.3f} (ideal {r['ideal_speedup']:.3f}), "
          f"efficiency {r['efficiency']:.3f}")
    print(f"{'profiled, self CPU ms a step':<32} {'dense':>8} {'sparse':>8} {'sparse - dense':>15}")
    for k in CLASSES:
        d, s = r["profiled_dense"][k], r["profiled_sparse"][k]
        print(f"{k:<32} {d:8.3f} {s:8.3f} {s - d:15.3f}")
    d, s = (sum(r[f"profiled_{p}"].values()) for p in ("dense", "sparse"))
    print(f"{'all':<32} {d:8.3f} {s:8.3f} {s - d:15.3f}")


def main(argv) -> list:
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check_ranges(config, RANGES)
    for path in config["paths"]:
        if path not in PATHS:
            raise ValueError(f"--paths: unknown path {path!r}; choose from {', '.join(PATHS)}")
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    model, _ = load_weights.load(config["init"], config["dtype"], "cpu")
    model.requires_grad_(False).eval()
    if config["prompt_len"] + config["steps"] > model.cfg.max_seq_len:
        raise ValueError(f"--prompt_len + --steps = {config['prompt_len'] + config['steps']} exceeds the "
                         f"model's context of {model.cfg.max_seq_len}: make them smaller")
    router.add_routers(model, "sublayer", "all")
    prompt = torch.randint(0, model.cfg.vocab_size, (1, config["prompt_len"]))
    print(f"{config['init']}: {config['dtype']}, {where('cpu', config['threads'])}, batch 1, "
          f"{config['steps']} steps after {config['prompt_len']} tokens")
    rows = []
    for path in config["paths"]:
        if path == "compiled":       # inductor records its kernels and the matmuls it calls, by name
            with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
                rows += profile_path(path, Compiled(model), model, prompt, config)
        else:
            rows += profile_path(path, model, model, prompt, config)
    if config["json"]:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    run_main(main)
