"""research/self_text.py on a tiny random model folder: the text it writes, and its errors.

    python -m pytest tests/test_self_text.py -q

What is checked: the file holds at least --tokens sampled tokens, split into samples at blank
lines; the same seed writes the same text and another seed another; no temporary file is left
behind; a sample starts after BOS, or else after the end-of-text token, and ends before the first
end-of-text token it draws; bad flags are errors naming the fix.
"""
import json

import pytest

import load_weights
import test_train
from research import self_text

folder = test_train.folder            # the tiny llama model folder (a module-scoped fixture)


def write(folder, out, *flags):
    return self_text.main([f"--init={folder}", f"--out={out}", "--tokens=40", "--batch_size=2", "--length=12",
                           "--dtype=float32", *flags])


def test_writes_at_least_the_tokens_asked_for(folder, tmp_path, capsys, monkeypatch):
    drawn, generate = [], self_text.generate         # what the model drew: (B, 1 + new) per batch
    monkeypatch.setattr(self_text, "generate", lambda *a, **k: drawn.append(generate(*a, **k)) or drawn[-1])
    out = tmp_path / "self.txt"
    result = write(folder, out)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    text = out.read_text()
    _, tok = load_weights.load(str(folder))
    assert result["samples"] == len(text.strip().split("\n\n")) >= 1
    assert result["tokens"] >= 40                    # batches until 40 are drawn (no sample here is empty)
    assert len(tok.encode(text, special=False)) >= result["tokens"] - result["samples"]
    assert [p.name for p in tmp_path.iterdir()] == ["self.txt"]      # no .tmp left behind
    # each sample starts after <eos> (id 2: the tiny tokenizer adds no BOS) and ends before the
    # first <eos> it draws; the file is the samples, a blank line between them
    rows = [row for batch in drawn for row in batch.tolist()]
    assert all(row[0] == 2 for row in rows)
    samples = [row[1:row.index(2, 1)] if 2 in row[1:] else row[1:] for row in rows]
    assert any(len(ids) < 12 for ids in samples)     # an <eos> was drawn: the cut is tested
    kept = [ids for ids in samples if tok.decode(ids).strip()]
    assert text == "\n\n".join(tok.decode(ids).strip() for ids in kept) + "\n"
    assert result["tokens"] == sum(len(ids) for ids in kept)


def test_a_seed_is_a_text(folder, tmp_path):
    write(folder, tmp_path / "a.txt", "--seed=3")
    write(folder, tmp_path / "b.txt", "--seed=3")
    write(folder, tmp_path / "c.txt", "--seed=4")
    a, b, c = ((tmp_path / f"{n}.txt").read_text() for n in "abc")
    assert a == b and a != c


class Vocab:
    def __init__(self, ids):
        self.ids = ids

    def token_to_id(self, name):
        return self.ids.get(name)


class Tok:
    def __init__(self, adds_bos, bos_id, ids):
        self.adds_bos, self.bos_id, self.tok = adds_bos, bos_id, Vocab(ids)


def test_a_sample_starts_where_a_document_starts():
    assert self_text.start_id(Tok(True, 2, {"<eos>": 1})) == 2                # Gemma: after BOS
    assert self_text.start_id(Tok(False, 1, {"<|endoftext|>": 0})) == 0       # SmolLM2: after <|endoftext|>
    assert self_text.start_id(Tok(False, 1, {"</s>": 5})) == 5
    assert self_text.start_id(Tok(False, 7, {})) == 7                         # nothing else: BOS
    with pytest.raises(ValueError, match="no BOS or end-of-text token"):
        self_text.start_id(Tok(False, None, {}))


@pytest.mark.parametrize("flag, message", [
    ("--top_p=0", "--top_p=0 is out of range: it must be in (0, 1]"),
    ("--temperature=0", "--temperature=0 is out of range: it must be > 0"),
    ("--length=1", "--length=1 is out of range: it must be >= 2"),
])
def test_bad_flags_name_the_fix(folder, tmp_path, flag, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        write(folder, tmp_path / "x.txt", flag)
    assert not (tmp_path / "x.txt").exists()
