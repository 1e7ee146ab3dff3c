"""research/launch_profile.py — is a compacted forward bound by the host or by the device's kernels?

    python -m research.launch_profile --preset=llama-3.1-8b --device=cuda --dtype=bfloat16 --json
    python -m research.launch_profile        # SmolLM2-135M's shapes on the CPU: the op counts only
    python -m research.launch_profile --preset=llama-3.1-8b --device=cuda --dtype=bfloat16 --capacity=True --top=12

bench.py says how fast a compacted prefill or decoding step is; on a GPU this says why. A preset's
architecture is built with random weights on --device (nothing is read; the gates are forced, so
the time does not depend on the weights' values), with routers on every sublayer (kv="all"). At
each of --densities (1: the dense path, routers off; below 1: random gates forced at that
density, as bench.py forces them) it runs, after an untimed warm-up, once timed and once
under torch.profiler:

- one prefill of 1 x --seq_len tokens;
- --steps greedy decoding steps of batch 1 after it (per step: the totals over --steps).

For each call:
- wall_ms:   its wall-clock time, the device synchronized at its end, in a run of its own (the
             median of --repeat such runs; the profiler slows the host: profiled_ms is the profiled run's);
- ops:       the aten ops it dispatched (outermost only: an op that another op called is not counted);
- kernels:   the device kernels it launched (none on a CPU);
- kernel_ms: their summed device time: how long the device was busy (one stream: they do not overlap);
- busy:      kernel_ms / wall_ms. Near 1, the kernels are the bound and a skip saves their time;
             near 0, the host is (Python and launches), and a skip saves only the launches it avoids;
- top:       with --top=N, the N kernels (on a CPU: outermost ops) that took the most time, each
             [name, calls, ms] per call: what the time went to.

--capacity=True runs the prefills through capacity.py (fixed capacities, no reads back to the host;
the untimed warm-up learns the capacities), as bench.py --capacity=eager does.

Every option below is --key=value or --key value (--help lists them); --json prints the rows as one
JSON list on the last line.
"""
import json
import statistics
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

import router
from capacity import Capacity
from configurator import AT_LEAST_1, FRACTION, Range, check_ranges, overrides, run_main
from gates import forced
from generate import now
from load_weights import DTYPES, check_device
from model import PRESETS, Model, ModelConfig

DEFAULTS = dict(
    preset="smollm2-135m-instruct",  # the architecture of this preset (model.PRESETS), random weights
    densities=(1.0, 0.5),          # 1: the dense path (routers off); below: forced random gates
    seq_len=1024,                  # tokens of the prefill (and the decoding steps' context)
    steps=8,                       # decoding steps of batch 1 after the prefill
    threads=0,                     # torch.set_num_threads; 0 = torch's default
    seed=1337,
    dtype="float32",
    device="cpu",
    capacity=False,                # prefill through capacity.Capacity (fixed capacities, no reads back)
    top=0,                         # list the N kernels (on a CPU: ops) that took the most time, per call
    repeat=1,                      # timed runs of each call; wall_ms is their median
    json=False,                    # print the rows as one JSON list on the last line
)
RANGES = dict(densities=FRACTION, seq_len=Range(2), steps=AT_LEAST_1, threads=Range(0), seed=Range(0), top=Range(0),
              repeat=AT_LEAST_1)


def counts(prof, device) -> dict:
    """{ops, kernels, kernel_ms, by_name} of one profiled region; by_name: name -> [calls, ms] of each
    kernel on a GPU, of each outermost aten op on a CPU (the names the time went to)."""
    ops = kernels = 0
    kernel_us = 0.0
    by_name = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:           # a kernel on the device
            kernels += 1
            kernel_us += e.time_range.elapsed_us()
        elif e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")):
            ops += 1
        else:
            continue
        if (e.device_type != torch.autograd.DeviceType.CPU) == (device.type != "cpu"):
            calls_ms = by_name.setdefault(e.name, [0, 0.0])
            calls_ms[0] += 1
            calls_ms[1] += e.time_range.elapsed_us() / 1e3
    return dict(ops=ops, kernels=kernels, kernel_ms=kernel_us / 1e3, by_name=by_name)


def profiled(setup, fn, calls: int, device, top: int = 0, warmups: int = 1, repeat: int = 1) -> dict:
    """fn(setup()) after `warmups` untimed runs (setup untimed): `repeat` timed runs (their median),
    then one under the profiler for the counts (it slows the host). Its numbers per call (fn makes
    `calls` calls)."""
    def run(prof=None):
        state = setup()
        t0 = now(device)                                # the device's queued work done first
        with prof or nullcontext():
            fn(state)
            seconds = now(device) - t0
        return seconds * 1e3 / calls
    for _ in range(warmups):
        run()
    wall_ms = statistics.median(run() for _ in range(repeat))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    profiled_ms = run(prof)
    c = counts(prof, device)
    out = dict(wall_ms=wall_ms, profiled_ms=profiled_ms, ops=c["ops"] / calls, kernels=c["kernels"] / calls,
               kernel_ms=c["kernel_ms"] / calls)
    ranked = sorted(c["by_name"].items(), key=lambda item: -item[1][1])[:top]
    out["top"] = [[name, n / calls, ms / calls] for name, (n, ms) in ranked]
    out["busy"] = out["kernel_ms"] / wall_ms if device.type == "cuda" else None
    return out


@torch.inference_mode()
def launch_profile(config) -> list:
    device, dtype = torch.device(config["device"]), getattr(torch, config["dtype"])
    cfg = ModelConfig(**PRESETS[config["preset"]])
    if config["seq_len"] + config["steps"] > cfg.max_seq_len:
        raise ValueError(f"--seq_len + --steps = {config['seq_len'] + config['steps']} exceeds the "
                         f"context of {cfg.max_seq_len}: make them smaller")
    torch.manual_seed(config["seed"])
    with device:
        model = Model(cfg)
    model = model.to(dtype).requires_grad_(False).eval()
    router.add_routers(model, "sublayer", "all")
    idx = torch.randint(0, cfg.vocab_size, (1, config["seq_len"]), device=device)
    T, steps = config["seq_len"], config["steps"]

    forward = Capacity(model) if config["capacity"] else model   # the prefill's path

    def prefill(dense, _):
        forward(idx, routers_off=dense)

    def prompt(dense):              # a cache filled by the prefill of idx, and its last logits
        cache = model.new_cache(1, T + steps)
        return cache, model(idx, cache=cache, routers_off=dense, last_only=True)[0]

    def decode(dense, state):
        cache, logits = state
        for _ in range(steps):
            logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, routers_off=dense,
                              last_only=True)

    rows = []
    for density in config["densities"]:
        dense = density >= 1
        with forced(model, density):
            # with --capacity the first call learns the capacities, the second meets their shapes' kernels
            pre = profiled(lambda: None, lambda s: prefill(dense, s), 1, device, config["top"], 1 + config["capacity"],
                           config["repeat"])
            dec = profiled(lambda: prompt(dense), lambda s: decode(dense, s), steps, device, config["top"],
                           repeat=config["repeat"])
        for mode, r in (("prefill", pre), ("decode", dec)):
            rows.append(dict(preset=config["preset"], device=str(device), dtype=config["dtype"], mode=mode,
                             density=density, capacity=config["capacity"] and mode == "prefill", **r))
            report(rows[-1])
    return rows


def report(r: dict):
    busy = "" if r["busy"] is None else f"  busy {r['busy']:.2f}"
    print(f"{r['mode']:8s} density {r['density']:.2f}: {r['wall_ms']:9.2f} ms wall  {r['ops']:7.0f} ops  "
          f"{r['kernels']:7.0f} kernels  {r['kernel_ms']:8.2f} ms in kernels{busy}", flush=True)
    for name, n, ms in r["top"]:
        print(f"    {ms:8.2f} ms {n:6.0f}x  {name[:100]}")


def check(config):
    check_ranges(config, RANGES)
    if config["preset"] not in PRESETS:
        raise ValueError(f"--preset={config['preset']!r} is not one of model.PRESETS: {', '.join(PRESETS)}")
    if config["dtype"] not in DTYPES:
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {config['dtype']!r}")
    check_device(config["device"])


def main(argv) -> list:
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check(config)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    print(f"{config['preset']} (random weights), {config['dtype']} on {config['device']}: prefill 1 x "
          f"{config['seq_len']}, {config['steps']} decoding steps of batch 1 (per step)")
    rows = launch_profile(config)
    if config["json"]:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    run_main(main)
