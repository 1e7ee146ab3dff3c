"""data/prepare.py — text files -> token memmaps, and the windows of tokens the model reads.

train.py calls `load_sources` itself, so the main job needs no data step; run this file
only to re-make the held-out split of the shipped corpus:

    python data/prepare.py --split FOLDER     # FOLDER: the whole shakespeare.txt and python_docs.txt;
                                              # writes data/corpus/ and data/heldout/

Each source (a .txt file, or a .jsonl file with a "text" field per line) is tokenized once
with the base model's tokenizer, without special tokens, into a flat uint32 array cached at
data/cache/<key>.bin (nanoGPT style). The key hashes the file's bytes and the tokenizer, so a
changed file or another model gets its own cache. Files are written to a temporary name and
renamed, so an interrupted run never leaves a half-written cache behind.

Windows, one convention for training (train.py) and evaluation (scoring.py): a window is seq_len
text tokens, with BOS in front exactly when the tokenizer's own post-processor adds one
(Gemma's does, SmolLM2's does not), so the model sees text the way it was trained to. A window
is therefore seq_len + 1 tokens long with BOS, seq_len without.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
SPLIT_FRACTION = 0.1   # the last 10% of each shipped text (cut at a blank line) is held out


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}): "
                         "--data and --val_data take .txt or .jsonl files") from None


def read_text(path: Path) -> str:
    """A .txt file as is; a .jsonl file as its "text" fields joined by blank lines."""
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n} is not a JSON object with a \"text\" field") from None
        return "\n\n".join(texts)
    return read_utf8(path)


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


# ----------------------------------------------------------------------------------------------
# Windows (the convention in the docstring above)
# ----------------------------------------------------------------------------------------------

def with_bos(x: torch.Tensor, bos_id) -> torch.Tensor:
    """(N, seq_len) text tokens -> (N, seq_len + 1) with BOS in front; unchanged when bos_id is None."""
    if bos_id is None:
        return x
    return torch.cat([torch.full((len(x), 1), bos_id, dtype=torch.long), x], dim=1)


def consecutive_windows(ids: list, seq_len: int, bos_id, max_chunks: int = 0) -> torch.Tensor:
    """A text's ids cut into consecutive windows, the incomplete tail dropped (scoring.py)."""
    n = len(ids) // seq_len
    if max_chunks:
        n = min(n, max_chunks)
    scored = seq_len if bos_id is not None else seq_len - 1    # tokens with a predecessor in the window
    if n == 0 or scored < 1:
        raise ValueError(f"the text has {len(ids)} tokens, not enough for one window of --seq_len={seq_len} "
                         f"that scores a token: use a longer text or a smaller --seq_len")
    return with_bos(torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len), bos_id)


def _rows(toks: np.ndarray, starts, seq_len: int) -> list:
    return [torch.from_numpy(toks[s:s + seq_len].astype(np.int64)) for s in starts]


def spread_windows(sources: dict, seq_len: int, bos_id, count: int) -> torch.Tensor:
    """`count` fixed windows spread evenly over the held-out sources (train.py's periodic eval)."""
    rows = []
    for name, toks in sources.items():
        if len(toks) <= seq_len:
            raise ValueError(f"held-out text {name!r} has {len(toks)} tokens, fewer than one window of {seq_len}: "
                             "give more text, lower --seq_len, or turn the periodic eval off with --val_data=''")
        n = max(1, count // len(sources))
        rows += _rows(toks, np.linspace(0, len(toks) - seq_len - 1, n).astype(int), seq_len)
    return with_bos(torch.stack(rows), bos_id)


class RandomWindows:
    """Samples training windows (train.py). Each row picks a source uniformly, then a start.

    A source with few tokens (Python docs) weighs as much as a large one (Shakespeare), so the
    routers do not learn the statistics of one text only.
    """

    def __init__(self, sources: dict, seq_len: int, bos_id, seed: int):
        self.seq_len, self.bos = seq_len, bos_id
        for name, toks in sources.items():
            if len(toks) <= seq_len:
                raise ValueError(f"text {name!r} has {len(toks)} tokens, fewer than one window of "
                                 f"{seq_len}: give more text or lower --seq_len")
        self.sources = list(sources.values())
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        """(batch_size, seq_len [+ 1 with BOS]) token ids."""
        rows = []
        for _ in range(batch_size):
            toks = self.sources[int(torch.randint(len(self.sources), (1,), generator=self.gen))]
            start = int(torch.randint(len(toks) - self.seq_len, (1,), generator=self.gen))
            rows += _rows(toks, [start], self.seq_len)
        return with_bos(torch.stack(rows), self.bos)


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
