"""research/vs_hf.py — our dense model against transformers' on the same folder: is the code fast?

    python -m research.vs_hf --init=checkpoints/smollm2-135m-instruct-f32
    python -m research.vs_hf --init=checkpoints/smollm2-135m-instruct-f32 --repeat=1 --hf_new_tokens=16 --json

(formerly `python bench.py --vs_hf`.) Both models load the same Hugging Face folder in --dtype, in
this process; transformers runs its default (sdpa) attention. Timed, with timing.py's interleaving
(the two alternate, medians of --repeat runs after one warm-up each, under torch.inference_mode):
- prefill: one forward over 1 x hf_seq_len tokens of --text;
- decode:  greedy generation of hf_new_tokens after hf_prompt_len prompt tokens with a KV cache
           (ours: generate.generate; theirs: model.generate), and whether both chose the same tokens.
With --compile=True ours is compiled.Compiled (its one-token step one torch.compile graph, its
prefill's MLPs compiled on their rows); transformers stays eager.
speedup = transformers' seconds / ours. The clock is bench.py's: --clock=wall (time.perf_counter)
or cpu (process CPU seconds); on a GPU it waits for the device before every reading.

Needs transformers (pip install transformers). Every option below is --key=value or --key value
(python -m research.vs_hf --help lists them).
"""
import json

import torch

import load_weights
from compiled import Compiled
from configurator import AT_LEAST_0, AT_LEAST_1, check_ranges, overrides, run_main
from generate import generate
from timing import interleaved, make_clock, print_row, token_ids, where

DEFAULTS = dict(
    init="checkpoints/smollm2-135m-instruct-f32",  # a Hugging Face folder (or a preset name)
    text="data/heldout/python_docs.txt",           # where the token ids come from
    hf_seq_len=512,                   # forward over 1 x hf_seq_len tokens
    hf_prompt_len=128,                # generate hf_new_tokens after hf_prompt_len tokens
    hf_new_tokens=128,
    repeat=3,                         # timed runs per model; the median is reported
    threads=2,                        # torch.set_num_threads
    dtype="float32",
    seed=0,
    clock="wall",                     # wall | cpu (process CPU seconds: steadier on a shared machine)
    device="cpu",                     # cpu | cuda | cuda:1 ...
    compile=False,                    # ours through torch.compile (compiled.py; minutes to compile on a CPU)
    json=False,                       # print the rows as one JSON list on the last line
)
RANGES = dict(hf_seq_len=AT_LEAST_1, hf_prompt_len=AT_LEAST_1, hf_new_tokens=AT_LEAST_1, repeat=AT_LEAST_1,
              threads=AT_LEAST_1, seed=AT_LEAST_0)


def bench_vs_hf(model, folder, config, ids, clock) -> list:
    """Our dense forward and cached greedy generation (model: the model, or its Compiled) against
    transformers on the same weights."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError("research.vs_hf needs transformers: pip install transformers") from None
    weight = model.tok_emb.weight
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=weight.dtype).to(weight.device).eval()
    # as generate.generate: hf_new_tokens whatever they are, an end-of-sequence token too (min_new_tokens
    # would forbid it until the last, and pick another token where ours picks it)
    hf.generation_config.eos_token_id = None
    T, P, n = config["hf_seq_len"], config["hf_prompt_len"], config["hf_new_tokens"]
    idx, prompt = ids[:T][None], ids[:P][None]

    @torch.inference_mode()   # both sides, as generate.decode runs
    def ours_forward():
        t0 = clock()
        model(idx)
        return clock() - t0, []

    @torch.inference_mode()
    def hf_forward():
        t0 = clock()
        hf(idx)
        return clock() - t0, []

    out = []
    hf_s, ours_s, _ = interleaved(hf_forward, ours_forward, config["repeat"])
    ours = "compiled" if config["compile"] else "eager"
    out.append(dict(mode="prefill", batch=1, seq_len=T, ours=ours, ours_s=ours_s, hf_s=hf_s, speedup=hf_s / ours_s))
    print_row(out[-1])

    tokens = {}

    def ours_generate():
        t0 = clock()
        tokens["ours"] = generate(model, prompt, n, temperature=0.0)[0, P:]
        return clock() - t0, []

    @torch.inference_mode()
    def hf_generate():
        t0 = clock()
        tokens["hf"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                   do_sample=False, use_cache=True)[0, P:]
        return clock() - t0, []

    hf_s, ours_s, _ = interleaved(hf_generate, ours_generate, config["repeat"])
    out.append(dict(mode="decode", batch=1, seq_len=P + n, new_tokens=n, ours=ours, ours_s=ours_s, hf_s=hf_s,
                    speedup=hf_s / ours_s, same_tokens=bool(torch.equal(tokens["ours"], tokens["hf"]))))
    print_row(out[-1])
    return out


def check(config):
    check_ranges(config, RANGES)
    if config["clock"] not in ("wall", "cpu"):
        raise ValueError(f"--clock={config['clock']}: choose wall or cpu")
    if config["clock"] == "cpu" and config["device"] != "cpu":
        raise ValueError(f"--clock=cpu counts this process's CPU time, not --device={config['device']}'s: use --clock=wall")


def main(argv):
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check(config)
    torch.set_num_threads(config["threads"])
    clock = make_clock(config["clock"], config["device"])    # on a GPU: waits for its queued work
    torch.manual_seed(config["seed"])
    base, device = config["init"], config["device"]
    model, tok = load_weights.load(base, config["dtype"], device)
    model.requires_grad_(False).eval()
    longest = max(config["hf_seq_len"], config["hf_prompt_len"] + config["hf_new_tokens"])
    if longest > model.cfg.max_seq_len:
        raise ValueError(f"{longest} tokens exceed the model's context of {model.cfg.max_seq_len}: "
                         "lower --hf_seq_len, --hf_prompt_len or --hf_new_tokens")
    ids = token_ids(tok, config["text"], max(config["hf_seq_len"], config["hf_prompt_len"])).to(device)
    print(f"{base}: {config['dtype']}, {where(device, config['threads'])}, {config['clock']} clock, "
          f"median of {config['repeat']}" + (", ours compiled" if config["compile"] else ""))
    ours = Compiled(model) if config["compile"] else model
    rows = bench_vs_hf(ours, load_weights.resolve(base), config, ids, clock)
    if config["json"]:
        print(json.dumps(rows))


if __name__ == "__main__":
    run_main(main)
