"""sample.py — generate text with a KV cache, from a dense model or a sparse checkpoint.

    python sample.py --init=smollm2-135m-instruct --prompt="The capital of France is"
    python sample.py --init=checkpoints/gemma-3-270m-f32 --temperature=0 --max_new_tokens=40
    python sample.py --ckpt=out/smol --prompt="def fib(n):"     # a train.py checkpoint, sparse
    python sample.py --init=sparse-model/ --prompt="def fib(n):" # a folder export.py wrote, sparse

Decoding is generate.py's: a KV cache, one token at a time (--compile: compiled.py's step).
With --ckpt the sparse model (on the base the checkpoint names, or on --init, checked against
it), or with --init alone a folder export.py wrote, decodes through the compacted path, where
skipped sublayers are not computed at all, and the output shows where the compute went:
- each generated token is coloured by the share of routed sublayers that ran in the step that
  predicted it (dark = few, bright = many; --no_color prints the share in brackets instead);
- the density of attention and MLP per layer, over every position the model processed;
- tokens/s of the sparse model against the same weights run dense (LoRA merged into both,
  routers off), on the same prompt for the same number of tokens.

Every option below is --key=value or --key value (python sample.py --help lists them).
"""
import torch

import load_weights
import lora
import router
from checkpoint import load_sparse
from configurator import AT_LEAST_0, AT_LEAST_1, Range, check_ranges, overrides, run_main
from compiled import Compiled
from flops import compute_ratio
from generate import decode, generate, now, pieces

DEFAULTS = dict(
    init="smollm2-135m-instruct",   # model: a preset name or a Hugging Face-format folder (with --ckpt: its base)
    ckpt="",                        # a train.py out_dir: sample its sparse model instead of --init
    prompt="Once upon a time",
    num_samples=1,                  # samples drawn one after the other
    max_new_tokens=100,
    temperature=0.8,                # 0 = greedy (argmax)
    top_k=0,                        # sample among the k most likely tokens only; 0 = all
    top_p=1.0,                      # ... among the fewest tokens holding top_p of the probability; 1 = all
    seed=1337,
    dtype="float32",                # float32 | bfloat16 | float16
    device="cpu",                   # cpu | cuda | cuda:1 | mps
    no_color=False,                 # a sparse model: plain text, each token followed by its share of compute
    compile=False,                  # decode through compiled.py's compiled step (compiling takes minutes on a CPU)
)
RANGES = dict(num_samples=AT_LEAST_1, max_new_tokens=AT_LEAST_1, temperature=AT_LEAST_0, top_k=AT_LEAST_0,
              top_p=Range(0, 1, open_lo=True), seed=AT_LEAST_0)


# ----------------------------------------------------------------------------------------------
# Where the compute went (a sparse model)
# ----------------------------------------------------------------------------------------------

def step_share(records) -> float:
    """Share of routed sublayers the last position computed in one forward (B = 1)."""
    return router.GateStats(r.last() for r in records).mean()


def paint(text, share, color=True):
    """text on a grey background, dark for a share near 0, bright near 1 (ANSI 256 colours)."""
    if not color:
        return f"{text}[{share:.2f}]"
    grey = 232 + round(share * 23)                 # the 24 greys of the 256-colour palette
    fg = 16 if share > 0.5 else 255                # black on light, white on dark
    # colour each line on its own, so a newline does not paint the rest of the row
    return "\n".join(f"\033[48;5;{grey};38;5;{fg}m{line}\033[0m" if line else "" for line in text.split("\n"))


def density_table(stats, n_layers) -> str:
    """One line per layer: a 10-character bar and the density of attention and of the MLP."""
    density = stats.density()

    def cell(layer, kind):
        if (layer, kind) not in density:
            return f"{'not routed':<16}"
        d = density[(layer, kind)]
        return f"{'█' * round(10 * d):·<10} {d:5.2f}"
    lines = [f"layer  {'attn':<16}  mlp"]
    lines += [f"{layer:5d}  {cell(layer, 'attn')}  {cell(layer, 'mlp')}" for layer in range(n_layers)]
    return "\n".join(lines)


def sample_sparse(model, tok, idx, config, generator, stats):
    """Generate with the sparse model, print the tokens coloured by compute, then sparse vs dense
    speed; stats (router.GateStats of the positions processed) is updated in place."""
    generate(model, idx, 2)                      # untimed warm-up of both paths: one-time costs
    generate(model, idx, 2, routers_off=True)    # (kernel choice, allocations) are not compute
    t0 = now(config["device"])
    steps = list(decode(model, idx, config["max_new_tokens"], config["temperature"], config["top_k"] or None,
                        config["top_p"] if config["top_p"] < 1 else None, tok.eos_ids, generator))
    sparse_s = now(config["device"]) - t0
    new_ids = [int(x[0, 0]) for x, _ in steps]
    shares = [step_share(records) for _, records in steps]
    for _, records in steps:
        stats.add(records)
    color = not config["no_color"]
    text = "".join(paint(p, s, color) for p, s in zip(pieces(tok, idx[0].tolist(), new_ids), shares))
    print(config["prompt"] + text)
    if color:
        print("share of routed sublayers run to predict each token: "
              + " ".join(paint(f" {s:.0%} ", s) for s in (0, 0.25, 0.5, 0.75, 1)))
    n = len(new_ids)
    t0 = now(config["device"])
    generate(model, idx, n, routers_off=True)    # same prompt, same number of tokens, no EOS stop
    dense_s = now(config["device"]) - t0
    print(f"--- {n} tokens: sparse {n / sparse_s:.1f} tokens/s, dense {n / dense_s:.1f} tokens/s "
          f"({dense_s / sparse_s:.2f}x)")


def print_summary(model, stats, context):
    """Density per layer and per kind (averaged over the routed sublayers), and the compute ratio."""
    print(density_table(stats, model.cfg.n_layers))
    kinds = {k for _, k in stats.density()}
    parts = [f"{kind} {stats.mean(kind):.2f}" for kind in ("attn", "mlp") if kind in kinds]
    print(f"density {', '.join(parts)}; compute ratio {compute_ratio(model.cfg, context, stats.density()):.2f} "
          f"of the dense FLOPs at {context} tokens of context")


# ----------------------------------------------------------------------------------------------

def check(config):
    check_ranges(config, RANGES)
    load_weights.check_device(config["device"])


def main(argv):
    given = overrides(DEFAULTS, argv)
    config = dict(DEFAULTS, **given)
    check(config)
    torch.manual_seed(config["seed"])
    generator = torch.Generator(config["device"]).manual_seed(config["seed"])
    if config["ckpt"]:   # --init, when given, says where the checkpoint's base model is now
        model, tok, _ = load_sparse(config["ckpt"], config["dtype"], config["device"], given.get("init"))
        lora.merge(model)    # W += scale * B A: at inference the adapters cost nothing
    else:
        model, tok = load_weights.load(config["init"], config["dtype"], config["device"])
    sparse = bool(router.routers(model))     # a checkpoint, or a folder export.py wrote
    idx = torch.tensor([tok.encode(config["prompt"])], dtype=torch.long, device=config["device"])   # (1, T)
    if config["compile"]:   # the same model, its steps and its prompt's rows compiled (now: no timing counts it)
        model = Compiled(model)
        generate(model, idx, 2, routers_off=not sparse)
    stats = router.GateStats()
    for i in range(config["num_samples"]):
        if i:
            print("-" * 40)
        if sparse:
            sample_sparse(model, tok, idx, config, generator, stats)
            continue
        t0 = now(config["device"])
        out = generate(model, idx, config["max_new_tokens"], config["temperature"], config["top_k"] or None,
                       config["top_p"] if config["top_p"] < 1 else None, tok.eos_ids, generator)
        seconds = now(config["device"]) - t0
        n = out.shape[1] - idx.shape[1]
        print(config["prompt"] + "".join(pieces(tok, idx[0].tolist(), out[0, idx.shape[1]:].tolist())))
        print(f"--- {n} tokens in {seconds:.2f} s, {n / seconds:.1f} tokens/s")
    if sparse and stats.slots:
        print_summary(model, stats, idx.shape[1] + config["max_new_tokens"])


if __name__ == "__main__":
    run_main(main)
