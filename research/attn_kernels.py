"""research/attn_kernels.py — which kernel the kept queries of a compacted prefill should attend with, by measurement.

    python -m research.attn_kernels                      # SmolLM2-135M's heads, 1 x 1024 tokens, density 0.5, CPU
    python -m research.attn_kernels --preset=llama-3.1-8b --seq_len=2048 --device=cuda --dtype=bfloat16 --json

In a compacted prefill with kv="all" (compact.attention), the tokens that keep an attention sublayer
make queries at their original positions, and every token's K/V are keys: the query at position p
sees keys 0..p. This times one layer's attention for such queries (a random --density share of
--seq_len tokens, position 0 always kept; random q, k, v of the preset's head shapes: the time does
not depend on the values) with each candidate of --kernels:

- blocks:      compact.attend_blocks, what nanoskip runs: on a CPU blocks of 128 queries
               (compact.QUERY_BLOCK), each over the keys up to its last position, one masked SDPA call
               per block; on a GPU one masked call over all the keys (model.Attention.attend, which on
               CUDA repeats grouped K/V heads to the query heads, see model.MASKED_REPEAT_KV)
- sdpa_gqa:    one masked SDPA call over all the keys, grouped K/V heads (enable_gqa)
- sdpa_repeat: the same with K/V heads repeated to the query heads
- flex:        FlexAttention (torch.compile'd) with a block mask of the query positions, built once
- flex_mask:   the same, building the block mask in every call, as a layer would (the kept positions
               change from sublayer to sublayer)
- dense:       causal SDPA of every one of the --seq_len tokens: the dense layer's attention

Each row: the median of --repeat timed calls, the kernels called in turn (after two untimed rounds,
in which flex compiles), in milliseconds; "x dense", that time over the dense row's; "efficiency", the ideal time over it, the
ideal being the dense time times the kept queries' share of the visible (query, key) pairs; and the
largest difference of its output from sdpa_gqa's (the reference).

Every option below is --key=value or --key value (--help lists them); --json prints the result as
one JSON object on the last line.
"""
import json
import statistics

import torch
import torch.nn.functional as F

import compact
from configurator import AT_LEAST_1, FRACTION, Range, check_ranges, overrides, run_main
from generate import now
from load_weights import check_device
from model import PRESETS, Attention, ModelConfig, softcap

KERNELS = ("blocks", "sdpa_gqa", "sdpa_repeat", "flex", "flex_mask", "dense")   # the candidates, above
DEFAULTS = dict(
    preset="smollm2-135m-instruct",  # the head shapes of this preset (model.PRESETS); no weights are read
    seq_len=1024,                  # tokens of the prefill: keys, and the dense row's queries
    density=0.5,                   # share of the tokens that make a query
    kernels=KERNELS,               # which of them to time
    repeat=20,                     # timed calls per kernel, in turn with the others; the median is reported
    threads=0,                     # torch.set_num_threads; 0 = torch's default
    seed=1337,
    dtype="float32",
    device="cpu",
    json=False,                    # print the result as one JSON object on the last line
)
RANGES = dict(seq_len=Range(2), density=FRACTION, repeat=AT_LEAST_1, threads=Range(0), seed=Range(0))


def full_layer(cfg: ModelConfig) -> int:
    """The first layer that attends over the whole context (a sliding layer would limit the keys)."""
    return next(i for i in range(cfg.n_layers) if cfg.layer_type(i) == "full")


def candidates(a: Attention, q, k, v, q_pos, dense_q, kernels) -> dict:
    """{name: () -> output (B, Tq, H*D)} of each kernel in kernels (dense: (B, T, H*D))."""
    Tq, T, rep = q.shape[2], k.shape[2], a.H // a.Hkv
    every = torch.arange(T, device=q.device)[None]                               # (1, T) every position
    mask = a.mask(q_pos, every)                                                  # (1, 1, Tq, T)
    flat = lambda y: y.transpose(1, 2).flatten(2)                                # noqa: E731  (B, Tq, H*D)
    run = {
        "blocks": lambda: compact.attend_blocks(a, q, k, v, q_pos),
        "sdpa_gqa": lambda: flat(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale,
                                                                enable_gqa=rep > 1)),
        "sdpa_repeat": lambda: flat(F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=a.scale)),
        "dense": lambda: a.attend(dense_q, k, v, None, causal=True),
    }
    if a.softcap is not None:       # soft-capped scores: no SDPA kernel, the explicit path as attend runs it
        run["sdpa_gqa"] = run["sdpa_repeat"] = lambda: a.attend(q, k, v, mask)
        run["dense"] = lambda: a.attend(dense_q, k, v, a.mask(every, every))
    if {"flex", "flex_mask"} & set(kernels):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        visible = lambda b, h, qi, ki: q_pos[0][qi] >= ki                     # noqa: E731
        capped = None if a.softcap is None else (lambda s, b, h, qi, ki: softcap(s, a.softcap))   # noqa: E731
        block_mask = lambda: create_block_mask(visible, None, None, Tq, T, device=q.device)      # noqa: E731
        built = block_mask()
        attend = lambda bm: flat(flex(q, k, v, score_mod=capped, block_mask=bm, scale=a.scale,  # noqa: E731
                                      enable_gqa=rep > 1))
        run["flex"] = lambda: attend(built)
        run["flex_mask"] = lambda: attend(block_mask())
    return {name: run[name] for name in kernels}


def time_calls(runs: dict, repeat: int, device) -> dict:
    """{name: median seconds of a call} over repeat rounds that call every kernel once, in turn (so
    that a change in the machine's load falls on all of them), after two untimed rounds."""
    times = {name: [] for name in runs}
    for i in range(repeat + 2):
        for name, f in runs.items():
            t0 = now(device)
            f()
            if i >= 2:
                times[name].append(now(device) - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def attn_kernels(config) -> dict:
    cfg = ModelConfig(**PRESETS[config["preset"]])
    device, dtype = torch.device(config["device"]), getattr(torch, config["dtype"])
    with torch.device("meta"):                                      # its shapes and rules, no weights
        a = Attention(cfg, full_layer(cfg))
    g = torch.Generator().manual_seed(config["seed"])
    T = config["seq_len"]
    keep = torch.rand(T, generator=g) < config["density"]
    keep[0] = True
    q_pos = keep.nonzero()[:, 0][None].to(device)                   # (1, Tq) the kept positions
    Tq = q_pos.shape[1]
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)     # noqa: E731
    q, dense_q = rand(1, a.H, Tq, a.D), rand(1, a.H, T, a.D)
    k, v = rand(1, a.Hkv, T, a.D), rand(1, a.Hkv, T, a.D)
    runs = candidates(a, q, k, v, q_pos, dense_q, set(config["kernels"]) | {"sdpa_gqa"})
    with torch.inference_mode():
        reference = runs["sdpa_gqa"]().float()
        runs = {name: runs[name] for name in config["kernels"]}
        seconds = time_calls(runs, config["repeat"], device)
        diffs = {name: (f().float() - reference).abs().max().item() for name, f in runs.items() if name != "dense"}
    share = float((q_pos + 1).sum()) / (T * (T + 1) / 2)           # the kept queries' visible pairs
    dense_s = seconds.get("dense")
    rows = [dict(kernel=name, ms=s * 1e3, x_dense=s / dense_s if dense_s else None,
                 efficiency=dense_s * share / s if dense_s and name != "dense" else None, max_diff=diffs.get(name))
            for name, s in seconds.items()]
    return dict(preset=config["preset"], device=str(device), dtype=config["dtype"], seq_len=T, kept=Tq,
                heads=a.H, kv_heads=a.Hkv, head_dim=a.D, visible_share=share, rows=rows)


def table(out: dict) -> str:
    lines = [f"{out['preset']} heads {out['heads']}/{out['kv_heads']} x {out['head_dim']}, {out['dtype']} on "
             f"{out['device']}: {out['kept']} of {out['seq_len']} tokens query ({out['visible_share']:.3f} of "
             f"the visible pairs)",
             f"{'kernel':12s} {'ms':>9s} {'x dense':>8s} {'efficiency':>10s} {'max |diff|':>11s}"]
    for r in out["rows"]:
        cells = [f"{r['ms']:9.3f}"] + [f"{r[key]:{w}.3f}" if r[key] is not None else " " * (w - 1) + "-"
                                       for key, w in (("x_dense", 8), ("efficiency", 10))]
        diff = f"{r['max_diff']:11.2e}" if r["max_diff"] is not None else " " * 10 + "-"
        lines.append(f"{r['kernel']:12s} " + " ".join(cells) + " " + diff)
    return "\n".join(lines)


def check(config):
    check_ranges(config, RANGES)
    if config["preset"] not in PRESETS:
        raise ValueError(f"--preset={config['preset']!r} is not one of model.PRESETS: {', '.join(PRESETS)}")
    unknown = [k for k in config["kernels"] if k not in KERNELS]
    if unknown or not config["kernels"]:
        raise ValueError(f"--kernels: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(KERNELS)}")
    if config["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {config['dtype']!r}")
    check_device(config["device"])


def main(argv):
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check(config)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    out = attn_kernels(config)
    print(table(out))
    if config["json"]:
        print(json.dumps(out))


if __name__ == "__main__":
    run_main(main)
