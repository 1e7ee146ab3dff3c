"""self_text.py — training text written by the dense model itself.

The routers, LoRA and substitutes learn to match the dense model on the text they are trained
on. The shipped corpus is two narrow texts (Shakespeare and Python's docs); what a user runs the
model on is whatever the model was pretrained for. The model's own samples are that
distribution, and they cost no download and no licence: each sample starts at a document
boundary and is drawn token by token from the dense model (its KV cache, batched).

    python -m research.self_text --init=checkpoints/smollm2-135m-instruct --tokens=60000 --out=out/self.txt
    python train.py --data=data/corpus,out/self.txt        # a third of the windows: the model's own text

The file is written to a temporary name, then renamed: an interrupted run leaves no half file.
"""
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import load_weights
from checkpoint import write_text_atomic
from configurator import AT_LEAST_0, AT_LEAST_1, POSITIVE, Range, check_ranges, overrides, run_main
from generate import generate

DEFAULTS = dict(
    init="smollm2-135m-instruct",  # preset name or Hugging Face folder
    out="out/self.txt",            # the text file written
    tokens=60000,                  # at least this many sampled tokens in all
    batch_size=16,                 # samples drawn side by side
    length=256,                    # new tokens per sample at most (a sample also ends at EOS)
    temperature=1.0,               # 1 = the model's own distribution
    top_p=0.95,                    # drop the least likely 5 % of the mass (rare garbage); 1 = none
    seed=0,
    dtype="auto",                  # bfloat16 where the device has it natively, else float32
    device="cpu",
    threads=0,                     # torch.set_num_threads; 0 = torch's default
)
RANGES = dict(tokens=AT_LEAST_1, batch_size=AT_LEAST_1, length=Range(2), temperature=POSITIVE,
              top_p=Range(0, 1, open_lo=True), seed=AT_LEAST_0, threads=AT_LEAST_0)


def start_id(tok) -> int:
    """The token a document starts after: BOS where the tokenizer adds it (Gemma), else the
    end-of-text token that separates pretraining documents (SmolLM2's <|endoftext|>)."""
    if tok.adds_bos:
        return tok.bos_id
    for name in ("<|endoftext|>", "<eos>", "</s>"):
        if tok.tok.token_to_id(name) is not None:
            return tok.tok.token_to_id(name)
    if tok.bos_id is not None:
        return tok.bos_id
    raise ValueError("the tokenizer has no BOS or end-of-text token to start a sample from")


def samples(model, tok, config):
    """Yield (sampled text, its token count), batch by batch, until config["tokens"] tokens are
    drawn."""
    gen = torch.Generator(device=config["device"]).manual_seed(config["seed"])
    first = start_id(tok)
    stops = set(tok.eos_ids) | {first}
    drawn = 0
    with tqdm(total=config["tokens"], unit="tok") as bar:
        while drawn < config["tokens"]:
            idx = torch.full((config["batch_size"], 1), first, dtype=torch.long, device=config["device"])
            out = generate(model, idx, config["length"], temperature=config["temperature"],
                           top_p=None if config["top_p"] == 1 else config["top_p"], eos_ids=stops,
                           generator=gen)
            for row in out[:, 1:].tolist():
                ends = [i for i, t in enumerate(row) if t in stops]
                ids = row[:ends[0]] if ends else row                   # up to the sample's end
                drawn += len(ids)
                bar.update(len(ids))
                text = tok.decode(ids).strip()
                if text:
                    yield text, len(ids)


def main(argv) -> dict:
    config = dict(DEFAULTS, **overrides(DEFAULTS, argv))
    check_ranges(config, RANGES)
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    model, tok = load_weights.load(config["init"], config["dtype"], config["device"])
    model.eval()
    t0 = time.perf_counter()
    texts, counts = zip(*samples(model, tok, config))
    write_text_atomic(Path(config["out"]), "\n\n".join(texts) + "\n")
    out = dict(init=config["init"], out=config["out"], samples=len(texts), tokens=sum(counts),
               seconds=time.perf_counter() - t0)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_main(main)
