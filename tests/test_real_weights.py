"""Real checkpoints against transformers: SmolLM2-135M-Instruct and Gemma 3 270M, in float32.

    python -m pytest -m real -s        # -s prints the measured differences

The models are found by name as load_weights finds them (conftest.real_checkpoint): offline,
`python3 tools/make_checkpoints.py checkpoints` makes them. Both sides load the same files in
float32. For each model: our tokenizer gives the ids of
transformers' (BOS included where the tokenizer adds it); on ~250 tokens of English the logits
match to 1e-3; on ~800 tokens (past Gemma 3's 512-token sliding window) the logits of the last
positions match too; and 32 greedy tokens decoded with our KV cache equal transformers' generate().
"""
from pathlib import Path

import pytest
import torch

from conftest import real_checkpoint

from load_weights import load

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent
MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]
MAX_DIFF = 1e-3
NEW_TOKENS = 32


def english(paragraphs: int) -> str:
    """Plain English prose from the Python docs (data/corpus), starting at a fixed paragraph."""
    docs = (REPO / "data" / "corpus" / "python_docs.txt").read_text()
    start = docs.index("If keyword arguments are present, they are first converted to")
    chosen = docs[start:].split("\n\n")[:paragraphs]
    return "\n\n".join(" ".join(p.split()) for p in chosen)


@pytest.fixture(scope="module", params=MODELS)
def models(request):
    """(name, our model, our tokenizer, transformers model, transformers tokenizer)."""
    folder = real_checkpoint(request.param)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ours, tok = load(str(folder))
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, ours, tok, ref, AutoTokenizer.from_pretrained(folder)


def prompt_ids(tok, text):
    return torch.tensor([tok.encode(text)])                        # (1, T), BOS as the tokenizer adds it


def test_tokenizer_matches_transformers(models):
    name, _, tok, _, ref_tok = models
    text = english(paragraphs=1)
    ids = tok.encode(text)
    assert ids == ref_tok(text).input_ids
    assert tok.adds_bos == ("gemma" in name)                        # Gemma's tokenizer prepends <bos>
    assert tok.decode(ids[1:] if tok.adds_bos else ids) == text


@torch.no_grad()
def test_logits_match_transformers(models):
    name, ours, tok, ref, _ = models
    idx = prompt_ids(tok, english(paragraphs=1))
    expected = ref(idx).logits
    logits, _ = ours(idx)
    diff = (logits - expected).abs().max().item()
    print(f"\n{name}: {idx.shape[1]} tokens, max |logit diff| {diff:.2e} (max |logit| "
          f"{expected.abs().max().item():.1f})")
    assert diff < MAX_DIFF


@torch.no_grad()
def test_long_prompt_logits_match_transformers(models):
    """Positions past Gemma 3's sliding window (512) and far into the rope tables."""
    name, ours, tok, ref, _ = models
    idx = prompt_ids(tok, english(paragraphs=7))
    assert idx.shape[1] > 600
    last = 64                                                       # (1, 64, V): keeps memory small
    expected = ref(idx, logits_to_keep=last).logits
    hidden, _ = ours(idx, return_hidden=True)
    logits = ours.logits(hidden[:, -last:])
    diff = (logits - expected).abs().max().item()
    print(f"\n{name}: {idx.shape[1]} tokens, last {last} positions, max |logit diff| {diff:.2e}")
    assert diff < MAX_DIFF


@torch.no_grad()
def test_greedy_decoding_matches_transformers(models):
    name, ours, tok, ref, _ = models
    idx = prompt_ids(tok, english(paragraphs=1))
    T = idx.shape[1]
    # no end-of-sequence stop on either side: exactly NEW_TOKENS tokens each
    expected = ref.generate(idx, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)[0, T:]
    got = greedy(ours, idx, NEW_TOKENS)[0, T:]
    print(f"\n{name}: greedy continuation {tok.decode(got.tolist())!r}")
    assert len(expected) == NEW_TOKENS
    assert got.tolist() == expected.tolist()


def greedy(model, idx, steps):
    """generate.generate at temperature 0 (the KV-cached decoding loop of sample.py)."""
    from sample import generate
    return generate(model, idx, steps, temperature=0.0)
