"""research/tasks.py — benchmarks: BIG-bench multiple choice by log-likelihood, exact match by greedy generation.

    python -m research.tasks --init=checkpoints/smollm2-135m-instruct-f32 --tasks=data/benchmarks/bigbench --limit=100
    python -m research.tasks --ckpt=out/smol --tasks=data/benchmarks/bigbench --limit=100     # dense vs sparse
    python -m research.tasks --ckpt=out/smol --tasks=data/benchmarks/bigbench/arithmetic.json --gates=random \\
        --text=data/heldout/python_docs.txt

The task files are BIG-bench's
(data/benchmarks/bigbench; each example an `input` and `target_scores` {choice: score}, the
highest-scored choices correct; arithmetic adds `target`):
- prompt = task_prefix + example_input_prefix + input + example_output_prefix, with the file's
  own prefixes, else "", "\nQ: ", "\nA: " (BIG-bench's defaults): "\nQ: What is 3 plus 5?\nA: ".
  The choices are not listed in the prompt (append_choices_to_input is not applied).
- multiple choice, as lm-evaluation-harness scores it: each choice is a continuation of the
  prompt; trailing spaces of the prompt move to the front of the continuation (context
  "...\nA:", continuation " 8"); the continuation's tokens are encode(context + continuation)
  after the first len(encode(context)) tokens, so they are the tokens the model sees in running
  text; encode adds special tokens as the tokenizer's post-processor does (BOS for Gemma, none
  for SmolLM2: lm_eval's hf default). ll = sum of the continuation tokens' log-probabilities.
  acc: the argmax of ll is a correct choice; acc_norm: the same for ll / len(choice in
  characters); chance: the mean over examples of (correct choices / choices).
- exact match (tasks whose preferred_score is exact_str_match: the arithmetic files): greedy,
  KV-cached generation after the prompt until a newline, EOS or --max_new_tokens; the answer is
  the first match of the file's output_regex in the generated text, else the first number
  ([-+]?\\d+(\\.\\d+)?); it scores 1 when it equals the target.
- each score is a mean over n examples, reported with its standard error sqrt(p (1 - p) / n);
  with --ckpt, dense (LoRA off, every gate open) and sparse (--gates, as evaluate.py takes them)
  side by side, and the sparse model's density and compute ratio on the multiple-choice tokens
  themselves (padding left out; the compute ratio at their mean length).
- --gates=random keeps the densities the learned gates show on --text; --gates=peek takes the
  threshold that gives --target_compute on --text (so both need it), scores the choices on the
  masked path, and generates on the masked path without a KV cache (each new token recomputes
  the whole sequence: slower, and the same tokens as cached decoding would give).

research/suite.py and research/lm_eval_adapter.py score with these same functions.
Every option below is --key=value or --key value (python -m research.tasks --help lists them).
--json prints the results as one JSON object on the last line.
"""
import contextlib
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

import load_weights
import lora
import router
from configurator import AT_LEAST_0, AT_LEAST_1, Range, check_ranges, run_main
from flops import compute_ratio
from gates import PEEK, gates_as
from generate import decode, sample_next
from scoring import (check_compares_a_checkpoint, check_gates, dense_hidden, read_text, research_main,
                     sparse_hidden, windows)

DEFAULTS = dict(
    init="smollm2-135m-instruct",   # model: a preset name or a Hugging Face-format folder (with --ckpt: its base)
    ckpt="",                        # a train.py out_dir: score its sparse model beside its base
    tasks="data/benchmarks/bigbench",   # a folder of BIG-bench task .json files, or files joined by ","
    text="",                        # --gates=random|peek: the text their densities / threshold are set on
    seq_len=512,                    # ... in windows of this many tokens (evaluate.py's convention)
    batch_size=4,                   # ... windows per forward pass
    max_chunks=0,                   # ... only the first N windows; 0 = all
    limit=0,                        # the first N examples of each task; 0 = all
    requests_per_batch=16,          # (context, continuation) pairs or prompts per forward pass
    max_new_tokens=16,              # longest generated answer (exact match)
    gates="learned",                # --ckpt: learned | random | open | peek | peek_lora (evaluate.py's)
    path="compact",                 # --ckpt: compact (skipped work removed) | masked (training path)
    target_compute=0.9,             # --gates=peek: the compute ratio its threshold aims at
    seed=1337,                      # for --gates=random
    dtype="float32",                # float32 | bfloat16 | float16
    device="cpu",                   # cpu | cuda | cuda:1 | mps
    json=False,                     # print the results as one JSON object on the last line
)
RANGES = dict(seq_len=AT_LEAST_1, batch_size=AT_LEAST_1, max_chunks=AT_LEAST_0, seed=AT_LEAST_0,
              target_compute=Range(0, 1, open_lo=True), limit=AT_LEAST_0, requests_per_batch=AT_LEAST_1,
              max_new_tokens=AT_LEAST_1)


FIRST_NUMBER = r"[-+]?\d+(?:\.\d+)?"   # the answer of a task file without output_regex


@dataclass
class Task:
    """One BIG-bench task file (see the docstring on top for how it becomes prompts)."""
    name: str
    examples: list              # {"input": str, "target_scores": {choice: score}[, "target": str]}
    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    output_regex: Optional[str] = None
    exact_match: bool = False   # preferred_score exact_str_match: also score a generated answer


def read_task(path) -> Task:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read task file {path} ({e}): pass a BIG-bench task .json") from None
    examples = d.get("examples") if isinstance(d, dict) else None
    if not examples or any("input" not in ex or not ex.get("target_scores") or "" in ex["target_scores"]
                           for ex in examples):
        raise ValueError(f"{path}: every example needs an input and non-empty choices in target_scores "
                         "(a BIG-bench multiple-choice task file)")
    return Task(Path(path).stem, examples, d.get("task_prefix", ""), d.get("example_input_prefix", "\nQ: "),
                d.get("example_output_prefix", "\nA: "), d.get("output_regex"),
                d.get("preferred_score") == "exact_str_match")


def task_paths(spec: str) -> list:
    """--tasks: a folder (its *.json files, sorted) or files joined by ","."""
    if Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.json"))
    else:
        paths = [Path(p) for p in spec.split(",") if p]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise ValueError(f"--tasks={spec}: {', '.join(missing) or 'no .json files'} not found; "
                         "pass a folder of task files or files joined by ','")
    return paths


def prompt(task: Task, example: dict) -> str:
    return task.task_prefix + task.input_prefix + example["input"] + task.output_prefix


def encode_pair(tok, context: str, continuation: str):
    """(context ids, continuation ids), split the way lm-evaluation-harness splits them: the
    context's trailing spaces join the continuation, the whole string is encoded once, and the
    continuation is what follows the context's own encoding."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    if not ctx or len(whole) <= len(ctx):
        raise ValueError(f"cannot score {continuation!r} after {context!r}: the context or the continuation "
                         "encodes to no tokens")
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model, requests, batch_size=16, dense=False, desc=None, path="compact",
                          stats=None) -> list:
    """requests: (context ids, continuation ids) pairs -> (log p(continuation | context), greedy) each.

    Each pair is read as context + continuation without its last token, right-padded to the
    longest of its batch (attention is causal: padding after a sequence never reaches it); the
    continuation's log-probabilities come from the positions just before its tokens. greedy:
    every continuation token is the argmax (lm_eval's is_greedy). A pair longer than the model's
    context keeps its last max_seq_len + 1 tokens, as lm_eval truncates. dense: LoRA off, routers off;
    else the model as its gates are set, on path. stats: a router.GateStats that counts the gates
    of the requests' own tokens (not the padding).
    """
    device, L = model.tok_emb.weight.device, model.cfg.max_seq_len
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, disable=desc is None, leave=False) as bar:
        for idx in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
            seqs = [(requests[i][0] + requests[i][1])[-(L + 1):-1] for i in idx]
            T = max(map(len, seqs))
            x = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)   # (B, T) right-padded
            if dense:
                h = dense_hidden(model, x)                                              # (B, T, d)
            else:
                h, records = sparse_hidden(model, x, path)
                if stats is not None:                                                   # padding left out
                    lengths = torch.tensor([len(s) for s in seqs], device=device)
                    real = torch.arange(T, device=device) < lengths[:, None]               # (B, T)
                    stats.add(router.GateRecord(r.layer, r.kind, r.z, r.keep[real]) for r in records)
            for b, i in enumerate(idx):
                cont = torch.tensor(requests[i][1], device=device)                      # (n,)
                end = len(seqs[b])
                logp = F.log_softmax(model.logits(h[b, end - len(cont):end]).float(), dim=-1)   # (n, V)
                out[i] = float(logp.gather(1, cont[:, None]).sum()), bool((logp.argmax(-1) == cont).all())
            bar.update(len(idx))
    return out


def cut_at(text: str, until) -> str:
    """text up to the first occurrence of any stop string."""
    for s in until:
        text = text.split(s)[0]
    return text


@torch.no_grad()
def masked_decode(model, idx, max_new_tokens, temperature=0.0):
    """Yield next ids (B, 1) step by step like generate.decode, without a KV cache: every step runs
    the whole sequence (B, T + steps) on the masked path, where peek gates can decide."""
    if idx.shape[1] + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the prompt ({idx.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) exceed "
                         f"the model's context of {model.cfg.max_seq_len} tokens: lower --max_new_tokens")
    x = idx
    for _ in range(max_new_tokens):
        logits, records = model(x, masked=True, last_only=True)                   # (B, 1, V)
        nxt = sample_next(load_weights.finite(logits[:, -1]), temperature)   # (B, 1)
        x = torch.cat([x, nxt], dim=1)
        yield nxt, records


def generate_batch(model, tok, x, until, max_new_tokens, dense=False, temperature=0.0, path="compact") -> list:
    """x (B, T) prompts of one length -> the text each generates, cut before its first stop string.

    A sequence stops at EOS or once its text holds a stop string, the batch once all stopped.
    The sparse model on the masked path decodes without a cache (masked_decode)."""
    new, done = [[] for _ in range(len(x))], [False] * len(x)
    if path == "masked" and not dense:
        steps = masked_decode(model, x, max_new_tokens, temperature)
    else:
        steps = decode(model, x, max_new_tokens, temperature, eos_ids=tok.eos_ids, routers_off=dense)
    with lora.disabled(model) if dense else contextlib.nullcontext():
        for step, _ in steps:
            for b, t in enumerate(step[:, 0].tolist()):                # step (B, 1)
                if done[b]:
                    continue
                done[b] = t in tok.eos_ids
                if not done[b]:
                    new[b].append(t)
                    done[b] = any(s in tok.decode(new[b]) for s in until)
            if all(done):
                break
    return [cut_at(tok.decode(ids), until) for ids in new]


@torch.no_grad()
def generate_until(model, tok, prompts, until=("\n",), max_new_tokens=16, batch_size=16, dense=False,
                   temperature=0.0, desc=None, path="compact") -> list:
    """prompts: lists of token ids -> the text generated after each (KV-cached, generate.decode;
    greedy at temperature 0), cut before the first stop string of until; the sparse model on
    path="masked" decodes without a cache (peek gates need it).

    A batch holds prompts of one token length only, so nothing is padded (the model has no
    padding mask). A prompt longer than the context less max_new_tokens keeps its last tokens.
    """
    until = [s for s in until if s]
    keep = model.cfg.max_seq_len - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {model.cfg.max_seq_len} tokens: lower it")
    prompts = [p[-keep:] for p in prompts]
    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out = [None] * len(prompts)
    device = model.tok_emb.weight.device
    with tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False) as bar:
        for members in by_length.values():
            for idx in (members[i:i + batch_size] for i in range(0, len(members), batch_size)):
                x = torch.tensor([prompts[i] for i in idx], device=device)            # (B, T)
                texts = generate_batch(model, tok, x, until, max_new_tokens, dense, temperature, path)
                for i, text in zip(idx, texts):
                    out[i] = text
                bar.update(len(idx))
    return out


def extract_answer(text: str, regex: Optional[str] = None) -> str:
    """The first match of regex (the task's output_regex), else of the first number; "" if none."""
    m = re.search(regex or FIRST_NUMBER, text)
    return m.group(0) if m else ""


def choice_hits(lls, choices, scores):
    """(acc, acc_norm) of one example: is the argmax of ll, and of ll per character, a best choice?"""
    best = {i for i, s in enumerate(scores) if s == max(scores)}
    pred = max(range(len(lls)), key=lambda i: lls[i])
    pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))
    return float(pred in best), float(pred_norm in best)


def multiple_choice(model, tok, task, examples, batch_size=16, dense=False, desc=None, path="compact",
                    stats=None) -> dict:
    """{"acc": [0/1 per example], "acc_norm": [...]} of the choices' log-likelihoods
    (path, stats: as continuation_logprobs takes them)."""
    requests = [encode_pair(tok, prompt(task, ex), choice) for ex in examples for choice in ex["target_scores"]]
    lls = iter([ll for ll, _ in continuation_logprobs(model, requests, batch_size, dense, desc, path, stats)])
    hits = {"acc": [], "acc_norm": []}
    for ex in examples:
        mine = [next(lls) for _ in ex["target_scores"]]           # this example's choices, in order
        acc, acc_norm = choice_hits(mine, list(ex["target_scores"]), list(ex["target_scores"].values()))
        hits["acc"].append(acc)
        hits["acc_norm"].append(acc_norm)
    return hits


def exact_match(model, tok, task, examples, batch_size=16, max_new_tokens=16, dense=False, desc=None,
                path="compact") -> list:
    """0/1 per example: the answer extracted from the greedy generation equals the target."""
    prompts = [tok.encode(prompt(task, ex)) for ex in examples]
    texts = generate_until(model, tok, prompts, ("\n",), max_new_tokens, batch_size, dense, desc=desc, path=path)
    targets = [ex["target"] if isinstance(ex["target"], list) else [ex["target"]] for ex in examples]
    return [float(extract_answer(t, task.output_regex) in [str(a).strip() for a in ts])
            for t, ts in zip(texts, targets)]


def mean_stderr(hits) -> tuple:
    """(p, sqrt(p (1 - p) / n)) of n 0/1 scores."""
    p = sum(hits) / len(hits)
    return p, math.sqrt(p * (1 - p) / len(hits))


def benchmark(model, tok, task, limit=0, batch_size=16, max_new_tokens=16, variants=("dense",),
              path="compact") -> dict:
    """One task's row: examples, chance, and for each metric and variant ("dense": LoRA off,
    routers off; "sparse": the model as its routers are set, on path) the score and its standard
    error; for "sparse" also the density and compute ratio on the multiple-choice tokens."""
    examples = task.examples[:limit or None]
    scores = [list(ex["target_scores"].values()) for ex in examples]
    row = dict(task=task.name, examples=len(examples),
               chance=sum(s.count(max(s)) / len(s) for s in scores) / len(examples))
    for variant in variants:
        dense = variant == "dense"
        stats = None if dense else router.GateStats()
        metrics = multiple_choice(model, tok, task, examples, batch_size, dense, f"{task.name} {variant} mc",
                                  path, stats)
        if task.exact_match and all("target" in ex for ex in examples):
            metrics["exact_match"] = exact_match(model, tok, task, examples, batch_size, max_new_tokens, dense,
                                                 f"{task.name} {variant} generate", path)
        for metric, hits in metrics.items():
            row[f"{metric}_{variant}"], row[f"{metric}_{variant}_stderr"] = mean_stderr(hits)
        if stats is not None and stats.slots:
            tokens = next(iter(stats.slots.values()))             # the requests' tokens, all of them
            requests = sum(len(ex["target_scores"]) for ex in examples)
            row[f"density_{variant}"] = stats.mean(n_layers=model.cfg.n_layers)
            row[f"compute_ratio_{variant}"] = compute_ratio(model.cfg, max(1, round(tokens / requests)),
                                                            stats.density())
    return row


def benchmark_table(rows, variants) -> str:
    """The rows as a Markdown table: one line per task and metric, p ± stderr per variant."""
    lines = ["| task | n | chance | metric | " + " | ".join(variants) + " |",
             "|---|---|---|---|" + "---|" * len(variants)]
    for row in rows:
        for metric in ("acc", "acc_norm", "exact_match"):
            if f"{metric}_{variants[0]}" in row:
                chance = f"{row['chance']:.3f}" if metric != "exact_match" else "–"
                cells = [f"{row[f'{metric}_{v}']:.3f} ± {row[f'{metric}_{v}_stderr']:.3f}" for v in variants]
                lines.append(f"| {row['task']} | {row['examples']} | {chance} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_benchmarks(config, model, tok, name):
    """--tasks: every task file, dense (and with --ckpt or --gates=peek, sparse), printed as a table."""
    variants = ("dense", "sparse") if config["ckpt"] or config["gates"] == "peek" else ("dense",)
    tasks = [read_task(p) for p in task_paths(config["tasks"])]
    gates = config["gates"] if "sparse" in variants else "learned"
    chunks = None                                       # the windows random and peek gates are set on
    if config["text"]:
        chunks = windows(tok, read_text(config["text"]), config["seq_len"], config["max_chunks"])
    with gates_as(model, chunks, config["seq_len"], gates, config["path"], config["batch_size"], config["seed"],
                  config["target_compute"]) as path:
        rows = [benchmark(model, tok, t, config["limit"], config["requests_per_batch"], config["max_new_tokens"],
                          variants, path) for t in tqdm(tasks, desc="tasks")]
    print(f"{name}" + (f", sparse gates {gates}" if "sparse" in variants else "")
          + f": first {config['limit'] or 'all'} examples per task")
    print(benchmark_table(rows, variants))
    return dict(model=name, ckpt=config["ckpt"] or None, gates=gates if "sparse" in variants else None,
                limit=config["limit"], tasks=rows)


def check(config):
    if not config["tasks"]:
        raise ValueError("nothing to score: pass --tasks=DIR (a folder of BIG-bench task files, such as "
                         "data/benchmarks/bigbench) or files joined by ','")
    check_ranges(config, RANGES)
    if config["gates"] == "random" and not (config["ckpt"] and config["text"]):
        raise ValueError("--tasks with --gates=random needs --ckpt and --text=FILE, the text on which the "
                         "learned gates' densities are measured")
    check_compares_a_checkpoint(config, "--tasks with ")
    if config["gates"] in PEEK and not config["text"]:
        raise ValueError(f"--tasks with --gates={config['gates']} needs --text=FILE, the text on which the "
                         "threshold for --target_compute is chosen")
    check_gates(config)


main = research_main(DEFAULTS, check, main_benchmarks)


if __name__ == "__main__":
    run_main(main)
