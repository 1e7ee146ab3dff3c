"""data/prepare.py — text files -> token memmaps that train.py samples windows from.

train.py calls `load_sources` itself, so the main job needs no data step; run this file
only to re-make the held-out split of the shipped corpus:

    python data/prepare.py --split ../shared/data     # writes data/corpus/ and data/heldout/

Each source (a .txt file, or a .jsonl file with a "text" field per line) is tokenized once
with the base model's tokenizer, without special tokens, into a flat uint32 array cached at
data/cache/<key>.bin (nanoGPT style). The key hashes the file's bytes and the tokenizer, so a
changed file or another model gets its own cache. Files are written to a temporary name and
renamed, so an interrupted run never leaves a half-written cache behind.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
SPLIT_FRACTION = 0.1   # the last 10% of each shipped text (cut at a blank line) is held out


def read_text(path: Path) -> str:
    """A .txt file as is; a .jsonl file as its "text" fields joined by blank lines."""
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n} is not a JSON object with a \"text\" field") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def list_files(spec: str) -> list:
    """--data: comma-separated files and/or folders (every .txt / .jsonl inside, sorted)."""
    files = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        p = Path(part)
        if p.is_dir():
            found = sorted(list(p.glob("*.txt")) + list(p.glob("*.jsonl")))
            if not found:
                raise ValueError(f"folder {p} holds no .txt or .jsonl files: point --data at text files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"data file {p} does not exist: check --data")
    if not files:
        raise ValueError("no data given: pass --data=FILE[,FILE...] or a folder of .txt/.jsonl files")
    return files


def tokenize_cached(path: Path, tokenizer, tokenizer_key: str) -> np.ndarray:
    """The tokens of one file (uint32), from the cache or freshly tokenized."""
    key = hashlib.sha256(path.read_bytes() + tokenizer_key.encode()).hexdigest()[:16]
    out = CACHE / f"{path.stem}-{key}.bin"
    if not out.exists():
        text = read_text(path)
        # tokenize paragraph by paragraph (fast, batched), keeping the separators
        pieces = [p + "\n\n" for p in text.split("\n\n")]
        pieces[-1] = pieces[-1][:-2]
        ids = [i for enc in tokenizer.tok.encode_batch(pieces, add_special_tokens=False) for i in enc.ids]
        if not ids:
            raise ValueError(f"{path} is empty: give it some text")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        np.asarray(ids, dtype=np.uint32).tofile(tmp)
        os.replace(tmp, out)
    return np.memmap(out, dtype=np.uint32, mode="r")


def tokenizer_key(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()


def load_sources(spec: str, tokenizer, tok_key: str) -> dict:
    """{file stem: uint32 token array} for every file named by spec."""
    return {p.stem: tokenize_cached(p, tokenizer, tok_key) for p in list_files(spec)}


def split_corpus(src: Path, corpus=HERE / "corpus", heldout=HERE / "heldout"):
    """Cut each shipped text into a training part and a held-out tail, at a blank line."""
    corpus.mkdir(exist_ok=True)
    heldout.mkdir(exist_ok=True)
    for path in sorted(Path(src).glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        cut = text.rfind("\n\n", 0, int(len(text) * (1 - SPLIT_FRACTION)))
        (corpus / path.name).write_text(text[:cut + 2], encoding="utf-8")
        (heldout / path.name).write_text(text[cut + 2:], encoding="utf-8")
        print(f"{path.name}: {cut + 2} chars for training, {len(text) - cut - 2} held out")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--split":
        sys.exit("usage: python data/prepare.py --split SOURCE_FOLDER")
    split_corpus(Path(sys.argv[2]))
