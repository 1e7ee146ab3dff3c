"""tools/snapshot.py — record what nanoskip's commands output on tiny random models, and diff two records.

    python tools/snapshot.py --out=/tmp/before.pt                  # run from the repository root
    python tools/snapshot.py --diff /tmp/before.pt /tmp/after.pt   # exit 1 if anything differs

A restructure (files moved, scripts renamed) should change nothing a user sees but where files
live. This script checks that, tensor for tensor: in a temporary folder it builds tiny seeded
float32 model folders with transformers (a LLaMA one, and a Gemma 3 one whose tokenizer adds
BOS), a word-level tokenizer and random-word texts, then runs every command of COMMANDS below
as a user would (a subprocess of sys.executable, cwd = the repository root, one thread) and
records its return code, its stdout, its --json result, and the files it writes (safetensors
tensors, JSON, text). Wall-clock timings are masked where they are recorded (JSON fields such
as sparse_s, seconds, speedup, tok_s; the decimals of stdout lines that report seconds or
tokens/s), and the temporary folder and the repository's path read $TMP and $REPO, so that two
runs of the same code give equal records. A failing command is recorded (rc, stderr tail), not
fatal. --diff compares tensors with torch.equal, everything else exactly, and prints every
difference. The record is one torch.save'd dict {key: tensor | number | str | bool | None}.

COMMANDS is written in the current layout's names; old_layout() maps them back for a checkout
that predates the restructure (eval.py, no evaluate.py). A later restructure edits the table.
"""
import argparse
import difflib
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path.cwd()    # the repository root: run from there
# ----------------------------------------------------------------------------------------------
# The commands, in the NEW layout's names. {model}: the tiny base folder, {run}: this family's
# temporary folder, {train}/{val}: text files, {tasks}: BIG-bench task files joined by ",".
# Each entry: (step name, command line after `python`, folders it writes (recorded), record stdout).
# ----------------------------------------------------------------------------------------------
SEQ = "--seq_len=16"
PROMPT = "--prompt='the cat sat' --temperature=0 --max_new_tokens=8"
BENCH = "--text={val} --densities=1,0.5 --prefill=1x16 --prompt_len=8 --new_tokens=4 --repeat=1 --threads=1 --json"
COMMANDS = [
    ("train", "train.py --init={model} --data={train} --val_data={val} --out_dir={run}/out --max_iters=4 "
              f"--batch_size=2 {SEQ} --eval_interval=2 --eval_batches=1 --fit_windows=2 --warmup_iters=1 "
              "--lora_rank=2 --lora_alpha=4", ["{run}/out"], True),
    ("evaluate_dense", f"evaluate.py --init={{model}} --text={{val}} {SEQ} --json", [], True),
    ("evaluate", f"evaluate.py --ckpt={{run}}/out --text={{val}} {SEQ} --json", [], True),
    ("evaluate_masked", f"evaluate.py --ckpt={{run}}/out --text={{val}} {SEQ} --path=masked --json", [], True),
    ("evaluate_random", f"evaluate.py --ckpt={{run}}/out --text={{val}} {SEQ} --gates=random --json", [], True),
    ("evaluate_peek", f"evaluate.py --ckpt={{run}}/out --text={{val}} {SEQ} --gates=peek --target_compute=0.9 "
                      "--json", [], True),
    ("sample_dense", f"sample.py --init={{model}} {PROMPT}", [], True),
    ("sample", f"sample.py --ckpt={{run}}/out {PROMPT} --no_color=True", [], True),
    ("sample_color", f"sample.py --ckpt={{run}}/out {PROMPT}", [], True),
    ("export", f"export.py --ckpt={{run}}/out --out={{run}}/exported --text={{val}} {SEQ}", ["{run}/exported"], True),
    ("evaluate_exported", f"evaluate.py --init={{run}}/exported --text={{val}} {SEQ} --json", [], True),
    ("sample_exported", f"sample.py --init={{run}}/exported {PROMPT} --no_color=True", [], True),
    ("bench", f"bench.py --init={{model}} {BENCH}", [], False),          # stdout: a table of timings
    ("bench_ckpt", f"bench.py --ckpt={{run}}/out {BENCH}", [], False),
    ("tasks", "-m research.tasks --tasks={tasks} --init={model} --json", [], True),
    ("tasks_ckpt", "-m research.tasks --tasks={tasks} --ckpt={run}/out --json", [], True),
]


def old_layout(argv: list) -> list:
    """Translation to the layout before the restructure (397e822 and earlier), used when the
    repository has eval.py and no evaluate.py: evaluate.py -> eval.py; `-m research.tasks` -> eval.py."""
    if argv[0] == "evaluate.py":
        return ["eval.py"] + argv[1:]
    if argv[:2] == ["-m", "research.tasks"]:
        return ["eval.py"] + argv[2:]
    return argv


# ----------------------------------------------------------------------------------------------
# Tiny inputs (our own version of tests/conftest.py's, so the test suite's layout does not matter)
# ----------------------------------------------------------------------------------------------
SPECIALS = ["<unk>", "<bos>", "<eos>"]                                     # ids 0, 1, 2
WORDS = "the a cat dog sat ran on under mat log and then it was big small red blue".split()
WORDS += [f"w{i}" for i in range(64 - len(SPECIALS) - len(WORDS))]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
HF = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3,
          bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {   # name: (transformers model_type, tokenizer adds BOS, config beyond HF)
    "llama": ("llama", False, {}),
    "gemma": ("gemma3_text", True, dict(    # smaller weights: at 0.3 its logits saturate (top-1 always agrees)
        initializer_range=0.05, head_dim=16, sliding_window=8, query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
}
TASKS = {   # BIG-bench task files: multiple choice, and exact match (greedy generation)
    "choice": dict(examples=[{"input": "the cat sat on the", "target_scores": {"mat": 1, "log": 0, "red dog": 0}},
                             {"input": "a dog ran", "target_scores": {"under the log": 0, "and then it was big": 1}},
                             {"input": "it was", "target_scores": {"big": 1, "small": 1, "blue": 0}}]),
    "match": dict(preferred_score="exact_str_match", output_regex="[a-z]+",
                  examples=[{"input": "the cat sat on the", "target_scores": {"mat": 1, "log": 0}, "target": "mat"},
                            {"input": "it was", "target_scores": {"big": 1, "blue": 0}, "target": "big"}]),
}


def write_inputs(tmp: Path, family: str) -> dict:
    """A tiny random model folder (weights, config.json, tokenizer.json) and texts; the format fields."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    model_type, adds_bos, extra = FAMILIES[family]
    run = tmp / family
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.CONFIG_MAPPING[model_type](**{**HF, **extra}))
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:      # norms start at exactly 0 or 1: shake them, as the tests do
                p.add_(0.3 * torch.randn_like(p))
    ref.float().save_pretrained(run / "model")
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(run / "model" / "tokenizer.json"))
    rng = random.Random(0)
    for name, n in (("train", 3000), ("val", 400)):
        (run / f"{name}.txt").write_text(" ".join(rng.choice(WORDS[:18]) for _ in range(n)))
    for name, task in TASKS.items():
        (run / f"{name}.json").write_text(json.dumps(task))
    return dict(model=run / "model", run=run, train=run / "train.txt", val=run / "val.txt",
                tasks=f"{run / 'choice.json'},{run / 'match.json'}")


# ----------------------------------------------------------------------------------------------
# Recording: everything flattened to {key: leaf}, timings masked, temporary paths neutral
# ----------------------------------------------------------------------------------------------
TIMING = "<timing>"
TIMING_LINE = re.compile(r"tokens/s| s\b|speedup|seconds")
CKPT_NAME = re.compile(r"(ckpt-\d+)-[0-9a-f]+")              # ckpt-000003-<random hex>


def is_timing(key: str) -> bool:
    """Fields measured by the clock: seconds (*_s, seconds), tok_s, speedups and efficiency
    (ideal_speedup is the FLOP model's, not a measurement)."""
    return (key in ("seconds", "speedup", "efficiency") or key.endswith("_s")
            or key.endswith("_speedup") and key != "ideal_speedup")


def neutral(text: str, paths: dict) -> str:
    for path, name in paths.items():
        text = text.replace(path, name)
    return CKPT_NAME.sub(r"\1-?", text)


def mask_text(text: str, paths: dict) -> str:
    """Neutral paths; the decimals of lines that report seconds or tokens/s become #."""
    lines = [re.sub(r"\d+\.\d+", "#", ln) if TIMING_LINE.search(ln) else ln for ln in text.splitlines()]
    return neutral("\n".join(lines), paths)


def flatten(value, key: str, out: dict, paths: dict):
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(TIMING if is_timing(str(k)) and not isinstance(v, (dict, list)) else v,
                    f"{key}/{neutral(str(k), paths)}", out, paths)
        if not value:
            out[key] = "{}"
    elif isinstance(value, list):
        for i, v in enumerate(value):
            flatten(v, f"{key}/{i}", out, paths)
        out[f"{key}/len"] = len(value)
    else:
        out[key] = neutral(value, paths) if isinstance(value, str) else value


def record_folder(folder: Path, key: str, out: dict, paths: dict):
    """Every file under folder: safetensors -> tensors (+ metadata), JSON and JSON lines -> leaves, else text."""
    from safetensors import safe_open
    if not folder.is_dir():
        out[key] = "missing"
        return
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        k = f"{key}/{neutral(str(f.relative_to(folder)), paths)}"
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as h:
                flatten(h.metadata() or {}, f"{k}/metadata", out, paths)
                for name in h.keys():
                    out[f"{k}/{name}"] = h.get_tensor(name)
        elif f.suffix == ".json":
            flatten(json.loads(f.read_text()), k, out, paths)
        elif f.suffix == ".jsonl":
            flatten([json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()], k, out, paths)
        else:
            out[k] = mask_text(f.read_text(errors="replace"), paths)


def run_step(argv: list, key: str, folders: list, with_stdout: bool, out: dict, paths: dict, env: dict):
    t0 = time.time()
    p = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(f"  {key}: rc {p.returncode}, {time.time() - t0:.1f} s", flush=True)
    out[f"{key}/rc"] = p.returncode
    if p.returncode:
        out[f"{key}/stderr_tail"] = mask_text("\n".join(p.stderr.splitlines()[-15:]), paths)
    lines = p.stdout.rstrip("\n").splitlines()
    if lines and lines[-1][:1] in "[{":          # --json: the result on the last line
        try:
            flatten(json.loads(lines[-1]), f"{key}/json", out, paths)
            lines.pop()
        except json.JSONDecodeError:
            pass
    if with_stdout:
        out[f"{key}/stdout"] = mask_text("\n".join(lines), paths)
    for folder in folders:
        record_folder(Path(folder), f"{key}/files", out, paths)


def snapshot(out_path: str, families: list, keep: bool):
    if not (REPO / "train.py").is_file():
        sys.exit("run from the repository root (no train.py here)")
    legacy = (REPO / "eval.py").is_file() and not (REPO / "evaluate.py").is_file()
    print(f"{REPO}: {'old layout (eval.py)' if legacy else 'new layout'}")
    torch.set_num_threads(1)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="nanoskip-snapshot-"))
    paths = {str(tmp.resolve()): "$TMP", str(tmp): "$TMP", str(REPO.resolve()): "$REPO", str(REPO): "$REPO"}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    out, t0 = {}, time.time()
    try:
        for family in families:
            fields = write_inputs(tmp, family)
            record_folder(fields["model"], f"{family}/inputs/model", out, paths)
            for f in ("train", "val"):
                out[f"{family}/inputs/{f}.txt"] = fields[f].read_text()
            for step, command, folders, with_stdout in COMMANDS:
                argv = shlex.split(command.format(**fields))
                run_step(old_layout(argv) if legacy else argv, f"{family}/{step}",
                         [f.format(**fields) for f in folders], with_stdout, out, paths, env)
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    torch.save(out, out_path)
    print(f"wrote {out_path}: {len(out)} entries, {sum(torch.is_tensor(v) for v in out.values())} tensors, "
          f"{time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------
# Diff
# ----------------------------------------------------------------------------------------------

def same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def describe(a, b) -> str:
    if torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype:
        d = (a.double() - b.double()).abs()
        return f"{int((d > 0).sum())} of {a.numel()} elements differ, max |diff| {float(d.max()):.3g}"
    if isinstance(a, str) and isinstance(b, str):
        return "\n" + "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), "before", "after", lineterm=""))
    show = lambda v: f"tensor {v.dtype} {tuple(v.shape)}" if torch.is_tensor(v) else repr(v)
    return f"{show(a)} -> {show(b)}"


def diff(before_path: str, after_path: str) -> int:
    before, after = (torch.load(p, weights_only=True) for p in (before_path, after_path))
    n = 0
    for key in sorted(set(before) | set(after)):
        if key not in after:
            print(f"only in before: {key}")
        elif key not in before:
            print(f"only in after:  {key}")
        elif not same(before[key], after[key]):
            print(f"differs: {key}: {describe(before[key], after[key])}")
        else:
            continue
        n += 1
    print(f"{n} differences in {len(set(before) | set(after))} entries")
    return 1 if n else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="record a snapshot of this checkout into this file")
    ap.add_argument("--diff", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two snapshots")
    ap.add_argument("--families", default=",".join(FAMILIES), help="tiny models to run (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if bool(args.out) == bool(args.diff):
        ap.error("give either --out=FILE or --diff BEFORE AFTER")
    unknown = set(args.families.split(",")) - set(FAMILIES)
    if unknown:
        ap.error(f"--families: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FAMILIES)}")
    if args.diff:
        sys.exit(diff(*args.diff))
    snapshot(args.out, [f for f in args.families.split(",") if f], args.keep)
