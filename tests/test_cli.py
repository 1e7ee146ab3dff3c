"""tests/test_cli.py — sample.py, evaluate.py, research/plots.py and configurator.py on tiny model folders.

Each tiny model is a random transformers model saved the way the Hub ships one, plus a
word-level tokenizer.json: one without a post-processor (like SmolLM2's) for LLaMA, one that
prepends <bos> (like Gemma's) for Gemma 3. A sparse checkpoint is fabricated the way train.py
writes one: routers with random weights (about half the gates closed) and LoRA adapters.
"""
import importlib
import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import checkpoint
import evaluate
import gates
import generate
import load_weights
import lora
import router
import sample
import scoring
from configurator import configure
from research import plots
from conftest import TOKENIZER_HF, VOCAB, tiny_model_folder, word_text_file

REPO = Path(__file__).resolve().parent.parent
SEQ_LEN = 16
FAMILIES = {   # tiny_model_folder adds the tokenizer's vocabulary and special ids
    "llama": dict(),
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=12,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e6),
                                     "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
}
ADDS_BOS = {"llama": False, "gemma3_text": True}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tiny_hf, tmp_path_factory):
    """(reference transformers model, model folder with tokenizer.json, family name)."""
    family = request.param
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, family, ADDS_BOS[family], **FAMILIES[family])
    ref, _ = tiny_hf(family, **{**TOKENIZER_HF, **FAMILIES[family]})
    return ref, folder, family


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return word_text_file(tmp_path_factory, "val", 400, seed=0)


def make_checkpoint(out_dir: Path, base: Path, lora_std=0.0, route="sublayer", kv="all", seed=0):
    """A train.py-style checkpoint: random router weights (gates random-ish), LoRA B ~ N(0, lora_std)."""
    model, _ = load_weights.load(str(base))
    router.add_routers(model, route, kv)
    lora.inject(model, ("wq", "wv"), rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, r in router.routers(model):
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g))
            r.proj.bias.zero_()
        for m in lora.adapters(model):
            m.B.copy_(lora_std * torch.randn(m.B.shape, generator=g))
    trained = {k: v.detach().contiguous() for k, v in checkpoint.trained_parameters(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(trained, str(out_dir / checkpoint.CKPT_TENSORS))
    meta = dict(base=str(base), model_config=model.cfg.to_dict(),
                lora=dict(rank=4, alpha=8.0, targets=["wq", "wv"]))
    (out_dir / checkpoint.CKPT_JSON).write_text(json.dumps(meta))
    return out_dir


def run_cli(*args):
    """Run a CLI as a user would: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


# ----------------------------------------------------------------------------------------------
# configurator
# ----------------------------------------------------------------------------------------------

def test_configurator_types_and_errors():
    defaults = dict(n=1, lr=0.5, flag=False, name="x", targets=("wq", "wv"), limit=None)
    cfg = configure(defaults, ["--n=3", "--lr=1e-3", "--flag", "--name=a=b", "--targets=up,down", "--limit=7"])
    assert cfg == dict(n=3, lr=1e-3, flag=True, name="a=b", targets=("up", "down"), limit=7)
    assert configure(defaults, ["--flag=0"])["flag"] is False
    assert configure(defaults, ["--flag=true"])["flag"] is True
    assert configure(defaults, []) == defaults
    with pytest.raises(ValueError, match=r"unknown option --nn; valid options: --n, --lr, --flag"):
        configure(defaults, ["--nn=3"])
    for bad in (["--n=1.5"], ["--flag=maybe"], ["--n"], ["n=3"]):
        with pytest.raises(ValueError, match="--n|--flag|unexpected"):
            configure(defaults, bad)


def test_configurator_accepts_a_space_between_flag_and_value():
    defaults = dict(n=1, lr=0.5, flag=False, json=False, name="x", targets=("wq", "wv"))
    cfg = configure(defaults, ["--n", "3", "--lr", "-1e-3", "--flag", "--name", "a b", "--json", "false",
                               "--targets", "up,down"])
    assert cfg == dict(n=3, lr=-1e-3, flag=True, json=False, name="a b", targets=("up", "down"))
    assert configure(defaults, ["--flag", "--n", "2"]) == dict(defaults, flag=True, n=2)   # a bool alone: true
    for bad, message in ((["--n"], "--n needs a value"), (["--name", "--n=2"], "--name needs a value"),
                         (["--flag", "maybe"], "unexpected argument 'maybe'")):
        with pytest.raises(ValueError, match=message):
            configure(defaults, bad)


def test_the_readme_command_lines_work_as_written(tiny):
    """`python sample.py --prompt "..."` (a space, as in the README) and --help in every script."""
    _, folder, _ = tiny
    rc, out, err = run_cli("sample.py", "--init", str(folder), "--prompt", "the cat", "--temperature", "0",
                           "--max_new_tokens", "3")
    assert rc == 0, err
    assert out.startswith("the cat")
    for script, line in (("train.py", "--seed=1337"), ("sample.py", "--prompt="), ("evaluate.py", "--gates=learned"),
                         ("bench.py", "--densities="), ("export.py", "--out=sparse-model")):
        rc, out, err = run_cli(script, "--help")
        assert rc == 0 and out.startswith("options (default values") and line in out, (script, err)


def outside(valid):
    """A value just outside a configurator.Range."""
    return valid.lo if valid.open_lo else valid.lo - 1


@pytest.mark.parametrize("script", ["train", "evaluate", "sample", "bench", "research.tasks", "research.suite",
                                    "research.studies", "research.vs_hf", "research.step_profile",
                                    "research.self_text", "research.neuron_sparsity", "research.launch_profile",
                                    "research.router_fit"])
def test_every_numeric_flag_has_a_range_and_a_value_outside_it_is_named(script, tmp_path):
    module = importlib.import_module(script)
    numeric = [k for k, v in module.DEFAULTS.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               or isinstance(v, tuple) and v and isinstance(v[0], (int, float))]
    assert sorted(numeric) == sorted(module.RANGES)
    parse = module.read_config if script == "train" else module.main    # both check before loading anything
    extra = {"train": [f"--out_dir={tmp_path}"], "evaluate": ["--text=x"], "research.suite": ["--text=x"],
             "research.studies": ["--text=x", "--by_class"], "research.neuron_sparsity": ["--text=x"],
             "research.router_fit": ["--text=x"]}.get(script, [])
    for key, valid in module.RANGES.items():
        bads = [outside(valid)]
        if not isinstance(module.DEFAULTS[key], int):     # floats: also beyond the top, and infinity
            bads += [math.inf] + ([valid.hi + 1] if valid.hi < math.inf else [])
        for bad in bads:
            with pytest.raises(ValueError) as info:
                parse([f"--{key}={bad}"] + extra)
            assert str(info.value) == f"--{key}={bad:g} is out of range: it must be {valid}"


@pytest.mark.parametrize("argv, message", [
    (["--target_density=1.5"], "--target_density=1.5 is out of range: it must be in [0, 1]"),
    (["--target_density=0.9,-0.1"], "--target_density=-0.1 is out of range"),
    (["--grad_accum=0"], "--grad_accum=0 is out of range: it must be >= 1"),
    (["--lora_rank=-3"], "--lora_rank=-3 is out of range: it must be >= 0"),
    (["--seq_len=1"], "--seq_len=1 is out of range: it must be >= 2"),
    (["--batch_size", "0"], "--batch_size=0 is out of range"),
    (["--eval_interval=0"], "--eval_interval=0 is out of range"),
    (["--lr=nan"], "--lr=nan is out of range: it must be >= 0"),
])
def test_train_refuses_bad_numbers_before_loading_anything(argv, message, tmp_path):
    import train
    with pytest.raises(ValueError) as info:
        train.read_config(argv + [f"--out_dir={tmp_path}"])
    assert str(info.value) == message or str(info.value).startswith(message)


# ----------------------------------------------------------------------------------------------
# evaluate.py: the perplexity convention
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def hand_perplexity(ref, folder, text, seq_len, adds_bos):
    """The convention written out directly on the transformers model and the raw tokenizer."""
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    nll, count = 0.0, 0
    for i in range(len(ids) // seq_len):
        window = ([1] if adds_bos else []) + ids[i * seq_len:(i + 1) * seq_len]
        x = torch.tensor([window])
        nll += float(F.cross_entropy(ref(x).logits[0, :-1], x[0, 1:], reduction="sum"))
        count += len(window) - 1
    return math.exp(nll / count), count


def test_perplexity_convention_matches_hand_computation(tiny, text_file):
    ref, folder, family = tiny
    model, tok = load_weights.load(str(folder))
    assert tok.adds_bos == ADDS_BOS[family]
    text = text_file.read_text()
    chunks = scoring.windows(tok, text, SEQ_LEN)
    assert chunks.shape == (400 // SEQ_LEN, SEQ_LEN + tok.adds_bos)
    assert bool((chunks[:, 0] == 1).all()) == tok.adds_bos
    sums, _ = scoring.evaluate(model, chunks, batch_size=3)
    expected, count = hand_perplexity(ref, folder, text, SEQ_LEN, tok.adds_bos)
    assert sums["tokens"] == count == (400 // SEQ_LEN) * (SEQ_LEN if tok.adds_bos else SEQ_LEN - 1)
    assert math.exp(sums["nll"] / sums["tokens"]) == pytest.approx(expected, rel=1e-5)
    assert len(scoring.windows(tok, text, SEQ_LEN, max_chunks=2)) == 2


def test_text_too_short_is_a_clear_error(tiny):
    _, folder, _ = tiny
    _, tok = load_weights.load(str(folder))
    with pytest.raises(ValueError, match="not enough for one window"):
        scoring.windows(tok, "the cat sat", SEQ_LEN)
    if not tok.adds_bos:   # one token and no BOS: nothing has a predecessor
        with pytest.raises(ValueError, match="not enough for one window"):
            scoring.windows(tok, "the cat sat", 1)


def test_evaluate_cli_json_and_errors(tiny, text_file):
    _, folder, _ = tiny
    model, tok = load_weights.load(str(folder))
    sums, _ = scoring.evaluate(model, scoring.windows(tok, text_file.read_text(), SEQ_LEN))
    rc, out, err = run_cli("evaluate.py", f"--init={folder}", f"--text={text_file}", f"--seq_len={SEQ_LEN}", "--json")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens"] == sums["tokens"]
    assert result["perplexity"] == pytest.approx(math.exp(sums["nll"] / sums["tokens"]), rel=1e-6)
    with pytest.raises(ValueError, match="not enough for one window"):
        evaluate.main([f"--init={folder}", f"--text={text_file}", "--seq_len=10000"])


# ----------------------------------------------------------------------------------------------
# sample.py: decoding
# ----------------------------------------------------------------------------------------------

def prompts(batch, length, seed=0):
    return torch.randint(3, len(VOCAB), (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_greedy_equals_argmax_of_full_recomputation(tiny):
    _, folder, _ = tiny
    model, _ = load_weights.load(str(folder))
    idx = prompts(2, 5)
    out = generate.generate(model, idx, 12)                    # KV-cached
    assert out.shape == (2, 17) and torch.equal(out[:, :5], idx)
    seq = idx
    for _ in range(12):                                       # no cache: the whole sequence every step
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(generate.generate(model, idx[1:], 12), out[1:])   # batching changes nothing


@torch.no_grad()
def test_eos_stops_generation(tiny):
    _, folder, _ = tiny
    model, _ = load_weights.load(str(folder))
    idx = prompts(2, 5, seed=1)
    free = generate.generate(model, idx, 12)
    eos = int(free[0, 5 + 3])                                 # the 4th token of sequence 0
    first = [(row[5:] == eos).nonzero()[0, 0].item() if (row[5:] == eos).any() else None for row in free]
    out = generate.generate(model, idx[:1], 12, eos_ids={eos})
    assert torch.equal(out, free[:1, :5 + first[0] + 1])      # stops right after its first EOS
    both = generate.generate(model, idx, 12, eos_ids={eos})
    n = 12 if first[1] is None else max(first) + 1            # runs until every sequence has ended
    assert both.shape[1] == 5 + n
    assert bool((both[0, 5 + first[0]:] == eos).all())         # an ended sequence is padded with EOS


@torch.no_grad()
def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    _, folder, _ = tiny
    model, _ = load_weights.load(str(folder))
    idx = prompts(2, 5, seed=2)
    greedy = generate.generate(model, idx, 10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate.generate(model, idx, 10, temperature=1.5, top_k=1, generator=g), greedy)
    assert torch.equal(generate.generate(model, idx, 10, temperature=1.5, top_p=1e-6, generator=g), greedy)
    assert not torch.equal(generate.generate(model, idx, 10, temperature=5.0, generator=g), greedy)


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(generate.sample_next(logits, 1.0, generator=g, **kw)) for _ in range(300)}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {1, 3}
    assert draws(top_p=0.7) == {1, 3}          # 0.5 < 0.7 so the next one joins; 0.8 >= 0.7 stops
    assert draws(top_p=0.85) == {1, 2, 3}
    assert int(generate.sample_next(logits)) == 1


def test_prompt_longer_than_context_is_a_clear_error(tiny):
    _, folder, _ = tiny
    model, _ = load_weights.load(str(folder))
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        generate.generate(model, prompts(1, 60), 10)


def test_sample_cli(tiny):
    _, folder, _ = tiny
    model, tok = load_weights.load(str(folder))
    idx = torch.tensor([tok.encode("the cat")])
    new = generate.generate(model, idx, 8, eos_ids=tok.eos_ids)[0, idx.shape[1]:].tolist()
    rc, out, err = run_cli("sample.py", f"--init={folder}", "--prompt=the cat", "--temperature=0",
                           "--max_new_tokens=8")
    assert rc == 0, err
    assert out.splitlines()[0] == "the cat" + "".join(generate.pieces(tok, idx[0].tolist(), new))
    assert "tokens/s" in out
    rc, out, err = run_cli("sample.py", "--temprature=0")      # a user's mistake: one line, no traceback
    assert rc == 1 and out == "" and err.startswith("error: unknown option --temprature; valid options: --init")
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# --ckpt: the sparse model
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tiny, tmp_path_factory):
    """Two checkpoints of the same base and routers: LoRA B zero, and LoRA B nonzero."""
    _, folder, family = tiny
    root = tmp_path_factory.mktemp(f"{family}_ckpt")
    return make_checkpoint(root / "b0", folder), make_checkpoint(root / "b1", folder, lora_std=0.3)


def test_eval_sparse_compact_equals_masked(tiny, ckpts, text_file):
    _, folder, _ = tiny
    model, tok, _ = checkpoint.load_sparse(ckpts[1])
    chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
    compact = gates.evaluate_sparse(model, chunks, SEQ_LEN, batch_size=4, path="compact")
    masked = gates.evaluate_sparse(model, chunks, SEQ_LEN, batch_size=4, path="masked")
    for key in ("perplexity", "dense_perplexity", "kl_to_dense", "top1_agreement", "density", "compute_ratio"):
        assert compact[key] == pytest.approx(masked[key], rel=1e-4, abs=1e-6), key
    assert 0.2 < compact["density"] < 0.8 and compact["compute_ratio"] < 1
    assert compact["kl_to_dense"] > 1e-3 and 0 < compact["top1_agreement"] <= 1
    assert len(compact["per_layer"]) == 2
    assert compact["density"] == pytest.approx((compact["density_attn"] + compact["density_mlp"]) / 2)
    # the dense reference is exactly the base model
    base, _ = load_weights.load(str(folder))
    sums, _ = scoring.evaluate(base, chunks)
    assert compact["dense_perplexity"] == pytest.approx(math.exp(sums["nll"] / sums["tokens"]), rel=1e-5)


@torch.no_grad()
def test_kl_and_top1_agreement_match_a_hand_computation(tiny, ckpts, text_file):
    """kl_to_dense = mean over scored tokens of KL(p_dense || p_sparse); top1_agreement = share of
    scored tokens whose argmax is the dense one's (not the target's). Dense: the base model in
    transformers; sparse: the checkpoint (LoRA on, its gates) as model(x) runs it."""
    ref, _, _ = tiny
    model, tok, _ = checkpoint.load_sparse(ckpts[1])
    chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
    got = gates.evaluate_sparse(model, chunks, SEQ_LEN, batch_size=3)
    x = chunks[:, :-1]                                                     # every window's inputs
    logp = F.log_softmax(model(x)[0].float(), dim=-1)                      # (N, T, V) sparse
    logp_ref = F.log_softmax(ref(x).logits.float(), dim=-1)                # (N, T, V) dense
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)                      # (N, T) per token
    agree = logp.argmax(-1) == logp_ref.argmax(-1)
    assert got["tokens"] == kl.numel()
    assert got["kl_to_dense"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert got["top1_agreement"] == int(agree.sum()) / agree.numel()
    hits = int((logp.argmax(-1) == chunks[:, 1:]).sum())                    # agreement with the targets:
    assert hits != int(agree.sum())                                         # other, so the check can tell


def test_gates_open_kl_is_zero_only_when_lora_b_is_zero(ckpts, text_file):
    results = []
    for ckpt in ckpts:
        model, tok, _ = checkpoint.load_sparse(ckpt)
        chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
        results.append(gates.evaluate_sparse(model, chunks, SEQ_LEN, gates="open"))
    zero_b, nonzero_b = results
    assert zero_b["kl_to_dense"] == 0 and zero_b["perplexity"] == zero_b["dense_perplexity"]
    assert zero_b["density"] == 1 and zero_b["compute_ratio"] == 1 and zero_b["top1_agreement"] == 1
    assert nonzero_b["kl_to_dense"] > 1e-5          # any adapter moves the logits


def test_gates_random_match_learned_densities(ckpts, text_file):
    model, tok, _ = checkpoint.load_sparse(ckpts[0])
    chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
    learned = gates.evaluate_sparse(model, chunks, SEQ_LEN, gates="learned")
    random_ = gates.evaluate_sparse(model, chunks, SEQ_LEN, gates="random", seed=0)
    for a, b in zip(learned["per_layer"], random_["per_layer"]):
        for kind in ("attn", "mlp"):
            assert b[kind] == pytest.approx(a[kind], abs=0.08)
    assert random_["kl_to_dense"] != pytest.approx(learned["kl_to_dense"])
    assert all(isinstance(r, router.Router) for _, _, r in router.routers(model))   # restored afterwards


def test_gates_peek_lands_on_the_target_compute_with_the_base_weights(tiny, ckpts, text_file, tmp_path):
    """--gates=peek: compute ratio within 0.005 of the target; the base weights decide and answer,
    so checkpoints of one base (other adapters; other routers too) give the same numbers."""
    other = make_checkpoint(tmp_path / "seed1", tiny[1], lora_std=0.3, seed=1)      # other routers
    assert not all(torch.equal(a, b) for a, b in zip(*(
        [r.proj.weight for _, _, r in router.routers(checkpoint.load_sparse(c)[0])] for c in (ckpts[1], other))))
    results = []
    for ckpt in (*ckpts, other):
        model, tok, _ = checkpoint.load_sparse(ckpt)
        chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
        results.append(gates.evaluate_sparse(model, chunks, SEQ_LEN, gates="peek", target_compute=0.8))
        assert all(isinstance(r, router.Router) for _, _, r in router.routers(model))   # restored afterwards
        assert all(m.enabled for m in lora.adapters(model))
    a = results[0]
    assert a["compute_ratio"] == pytest.approx(0.8, abs=0.005)
    for b in results[1:]:
        assert a["perplexity"] == b["perplexity"] and a["kl_to_dense"] == b["kl_to_dense"] > 0
        assert a["dense_perplexity"] == b["dense_perplexity"]
    with pytest.raises(ValueError, match="outside what peek gates reach"):
        gates.evaluate_sparse(model, chunks, SEQ_LEN, gates="peek", target_compute=0.01)


def test_gates_peek_lora_runs_the_peek_rule_with_the_trained_adapters(ckpts, text_file):
    """--gates=peek_lora: the same rule and target, with LoRA on. A checkpoint whose LoRA B is
    zero gives --gates=peek's numbers exactly; one with trained adapters gives others."""
    out = {}
    for ckpt in ckpts:
        model, tok, _ = checkpoint.load_sparse(ckpt)
        chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
        for g in ("peek", "peek_lora"):
            out[ckpt, g] = gates.evaluate_sparse(model, chunks, SEQ_LEN, gates=g, target_compute=0.8)
            assert all(m.enabled for m in lora.adapters(model))                         # restored afterwards
    zero, trained = ckpts
    assert out[zero, "peek_lora"]["compute_ratio"] == pytest.approx(0.8, abs=0.005)
    assert out[trained, "peek_lora"]["compute_ratio"] == pytest.approx(0.8, abs=0.005)
    assert out[zero, "peek_lora"]["perplexity"] == out[zero, "peek"]["perplexity"]
    assert out[trained, "peek_lora"]["perplexity"] != out[trained, "peek"]["perplexity"]
    assert out[trained, "peek"]["perplexity"] == out[zero, "peek"]["perplexity"]         # peek: the base weights
    with pytest.raises(ValueError, match="peek_lora .* pass --ckpt"):
        evaluate.main([f"--text={text_file}", "--gates=peek_lora"])
    for flag in ("--gates=random", "--gates=open", "--path=masked"):     # without --ckpt: nothing to compare
        with pytest.raises(ValueError, match=f"{flag} compares a checkpoint .* pass --ckpt"):
            evaluate.main([f"--text={text_file}", flag])


def test_frontier_draws_one_line_per_method(tmp_path):
    rows = [dict(gates="learned", compute_ratio=0.9, perplexity=11.0), dict(gates="learned", compute_ratio=0.95, perplexity=10.5),
            dict(gates="random", compute_ratio=0.9, perplexity=15.0), dict(gates="peek", compute_ratio=0.9, perplexity=12.0),
            dict(gates="learned", method="static blocks (ShortGPT)", compute_ratio=0.9, perplexity=20.0)]
    for i, row in enumerate(rows):   # results without a method (older files) are named by their gates
        (tmp_path / f"r{i}.json").write_text("a line that is not JSON\n" + json.dumps(dict(model="m", dense_perplexity=10.0, **row)) + "\n")
    plots.main([f"--frontier={tmp_path}/r*.json", f"--plot={tmp_path / 'f.svg'}"])
    svg = (tmp_path / "f.svg").read_text()
    assert svg.count("<polyline") == 4 and svg.count("<circle") == 5
    assert all(f">{g}</text>" in svg for g in ("routed (ours)", "random gates", "peek rule", "static blocks (ShortGPT)"))
    with pytest.raises(ValueError, match="needs result files"):
        plots.main([f"--frontier={tmp_path}/none*.json", f"--plot={tmp_path / 'g.svg'}"])


def test_speed_draws_prefill_decoding_and_one_ideal_per_model(tmp_path):
    def rows(speedups):       # bench.py --json rows: forced densities 1 and 0.5, prefill and decoding
        forced = [dict(mode=m, gates="random", density=d, speedup=speedups[m, d], ideal_speedup={1.0: 1.0, 0.5: 1.6}[d])
                  for m in ("prefill", "decode") for d in (1.0, 0.5)]
        return forced + [dict(mode="prefill", gates="compiled", density=1.0, speedup=9.0, ideal_speedup=1.0)]
    cpu = {("prefill", 1.0): 0.98, ("prefill", 0.5): 1.5, ("decode", 1.0): 0.97, ("decode", 0.5): 1.45}
    gpu = {("prefill", 1.0): 0.9, ("prefill", 0.5): 0.5, ("decode", 1.0): 0.8, ("decode", 0.5): 1.2}
    (tmp_path / "cpu.json").write_text("a table\n" + json.dumps(rows(cpu)) + "\n")
    (tmp_path / "gpu.json").write_text(json.dumps(rows(gpu)) + "\n")
    svg_path = tmp_path / "s.svg"
    plots.main([f"--speed=CPU={tmp_path}/cpu.json,{tmp_path}/gpu.json@prefill", f"--plot={svg_path}"])
    svg = svg_path.read_text()
    # CPU: prefill, decoding, the ideal; gpu: its prefill only, and the same ideal is not drawn again
    assert svg.count("<polyline") == 4 and svg.count("<circle") == 6          # the compiled row left out
    assert all(f">{name}</text>" in svg for name in ("CPU, prefill", "CPU, decode", "CPU, ideal", "gpu, prefill"))
    assert "gpu, decode" not in svg and "gpu, ideal" not in svg
    with pytest.raises(ValueError, match="FILE@prefill or FILE@decode"):
        plots.main([f"--speed={tmp_path}/cpu.json@both", f"--plot={svg_path}"])
    mixed = rows(cpu) + [dict(r, kv="kept") for r in rows(cpu)]                 # bench.py's default: two kv modes
    (tmp_path / "mixed.json").write_text(json.dumps(mixed) + "\n")
    with pytest.raises(ValueError, match="prefills of 2 setups"):
        plots.main([f"--speed={tmp_path}/mixed.json", f"--plot={svg_path}"])
    (tmp_path / "eval.json").write_text(json.dumps(dict(model="m", perplexity=10.0)) + "\n")   # evaluate.py's
    with pytest.raises(ValueError, match="no rows of forced densities"):
        plots.main([f"--speed={tmp_path}/eval.json", f"--plot={svg_path}"])
    with pytest.raises(ValueError, match="draw one picture"):
        plots.main([f"--speed={tmp_path}/cpu.json", f"--frontier={tmp_path}/eval.json", f"--plot={svg_path}"])


def test_a_result_names_the_method_that_made_its_skips():
    assert scoring.method(dict(route="sublayer", kv="all"), "learned") == "routed (ours)"
    assert scoring.method(dict(route="block", kv="kept"), "learned") == "routed, route=block, kv=kept"
    assert scoring.method(dict(prune="kl"), "learned") == "static sublayers, KL"
    assert scoring.method(dict(prune="kl"), "random") == "random gates"
    assert scoring.method(dict(route="sublayer", kv="all", substitute=8), "learned") == "routed (ours), rank-8 substitutes"
    assert scoring.method(dict(prune="layer", substitute=0), "learned") == "static blocks (ShortGPT), mean substitute"
    assert scoring.method(dict(substitute=8), "peek") == "peek rule, rank-8 substitutes"


@torch.no_grad()
def test_decode_records_are_the_gates_of_a_full_forward(ckpts):
    """The share shown for each generated token = the gates of the position that predicted it,
    the same whether decoded step by step with the cache or recomputed in one pass."""
    model, _, _ = checkpoint.load_sparse(ckpts[1])
    idx = prompts(1, 5, seed=3)
    steps = list(generate.decode(model, idx, 8))
    out = torch.cat([idx] + [x for x, _ in steps], dim=1)                  # (1, 13)
    _, records = model(out[:, :-1])                                        # positions 0..11
    for i, (_, step_records) in enumerate(steps):
        full = sum(bool(r.keep[0, 4 + i]) for r in records) / len(records)
        assert sample.step_share(step_records) == full
    assert any(bool(r.keep.any()) and not bool(r.keep.all()) for r in records)   # gates vary by token


def test_cli_with_checkpoint(tiny, ckpts, text_file, tmp_path, capsys):
    svg, saved = tmp_path / "density.svg", tmp_path / "r.json"
    rc, out, err = run_cli("evaluate.py", f"--ckpt={ckpts[1]}", f"--text={text_file}", f"--seq_len={SEQ_LEN}",
                           "--json", "--path=masked")
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("perplexity", "tokens", "dense_perplexity", "kl_to_dense", "top1_agreement", "density",
                "density_attn", "density_mlp", "compute_ratio", "per_layer", "sparse_s", "dense_s", "speedup"):
        assert key in result, key
    saved.write_text(out)                                                  # evaluate.py ... --json > r.json
    rc, out, err = run_cli("-m", "research.plots", f"--density={saved}", f"--plot={svg}")
    assert rc == 0 and out == f"wrote {svg}\n", err
    rects = ET.parse(svg).getroot().findall("{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 2 * 2 + 2                                         # 2 layers x (attn, mlp) + legend
    sample.main([f"--ckpt={ckpts[1]}", "--prompt=the cat", "--temperature=0", "--max_new_tokens=6", "--no_color"])
    out = capsys.readouterr().out
    shares = re.findall(r"\[(\d\.\d\d)\]", out.splitlines()[0])
    assert 1 <= len(shares) <= 6 and all(0 <= float(s) <= 1 for s in shares)
    assert "sparse" in out and "dense" in out and "layer" in out and "compute ratio" in out
    sample.main([f"--ckpt={ckpts[1]}", "--prompt=the cat", "--max_new_tokens=4"])
    assert "\033[48;5;" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--gates must be learned, random, open, peek or peek_lora, got 'lerned'"):
        evaluate.main([f"--ckpt={ckpts[1]}", f"--text={text_file}", "--gates=lerned"])


@pytest.mark.parametrize("flag", ["--tasks=x", "--suite", "--by_class", "--plot=x.svg", "--frontier=x.json"])
def test_evaluate_rejects_the_flags_that_moved_to_research(flag, text_file):
    """--tasks, --suite, --by_class/--by_position, --plot, --frontier now live in research/: evaluate.py
    names the flag it does not know and the ones it does, in one line, before loading anything."""
    rc, out, err = run_cli("evaluate.py", f"--text={text_file}", flag)
    name = flag.split("=")[0]
    assert rc == 1 and out == "" and err.startswith(f"error: unknown option {name}; valid options: --init, --ckpt")
    assert len(err.strip().splitlines()) == 1


def test_plots_density_errors_name_the_fix(tmp_path):
    dense = tmp_path / "dense.json"
    dense.write_text("a report line\n" + json.dumps(dict(model="m", perplexity=10.0)) + "\n")
    with pytest.raises(ValueError, match=r"holds no density per layer: .*evaluate.py --ckpt=OUT_DIR"):
        plots.main([f"--density={dense}", f"--plot={tmp_path / 'd.svg'}"])
    with pytest.raises(ValueError, match="needs a --plot=FILE.svg"):
        plots.main([f"--density={dense}"])
    with pytest.raises(ValueError, match=r"cannot read a result from .*missing.json"):
        plots.main([f"--density={tmp_path / 'missing.json'}", f"--plot={tmp_path / 'd.svg'}"])
    for argv in ([], [f"--density={dense}", f"--frontier={dense}", f"--plot={tmp_path / 'd.svg'}"]):
        with pytest.raises(ValueError, match="draw one picture: pass --density=RESULT.json, --frontier=.* or --speed="):
            plots.main(argv)
    assert not (tmp_path / "d.svg").exists()
    rc, out, err = run_cli("-m", "research.plots", "--plot=x.svg")        # one line, no traceback
    assert rc == 1 and err.startswith("error: draw one picture") and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Nothing silently wrong: damaged weights, damaged checkpoints, a base model that moved
# ----------------------------------------------------------------------------------------------

def test_non_finite_logits_are_an_error_naming_the_likely_causes(tiny, text_file, tmp_path):
    """One weight overwritten with NaN (the file's header intact): no `perplexity nan`, no garbage tokens."""
    import shutil
    _, folder, _ = tiny
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    tensors = load_file(str(damaged / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = math.nan
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    message = r"gave non-finite logits \(NaN or infinity\); likely causes: damaged weights .* --dtype=float32"
    with pytest.raises(load_weights.NonFiniteError, match="the model " + message):
        evaluate.main([f"--init={damaged}", f"--text={text_file}", f"--seq_len={SEQ_LEN}"])
    with pytest.raises(load_weights.NonFiniteError, match=message):
        sample.main([f"--init={damaged}", "--prompt=the cat", "--temperature=0", "--max_new_tokens=3"])


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "trained.safetensors").write_bytes((d / "trained.safetensors").read_bytes()[:300]),
     "trained.safetensors is missing, corrupt or truncated"),
    (lambda d: (d / "ckpt.json").write_text('{"base": \n'), "ckpt.json is not valid JSON"),
])
def test_a_damaged_checkpoint_under_ckpt_is_named(ckpts, text_file, tmp_path, damage, message):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts[1], ckpt)
    damage(ckpt)
    with pytest.raises(load_weights.LoadError, match=message):
        evaluate.main([f"--ckpt={ckpt}", f"--text={text_file}", f"--seq_len={SEQ_LEN}"])
    with pytest.raises(load_weights.LoadError, match=message):
        sample.main([f"--ckpt={ckpt}", "--max_new_tokens=2"])


def test_init_names_the_base_of_a_checkpoint_whose_base_moved(tiny, text_file, tmp_path, capsys):
    import shutil
    _, folder, _ = tiny
    shutil.copytree(folder, tmp_path / "before")
    ckpt = make_checkpoint(tmp_path / "ckpt", tmp_path / "before", lora_std=0.3)
    (tmp_path / "before").rename(tmp_path / "after")
    with pytest.raises(load_weights.LoadError, match="if it moved, name its new place with --init=FOLDER"):
        evaluate.main([f"--ckpt={ckpt}", f"--text={text_file}"])
    evaluate.main([f"--ckpt={ckpt}", "--init", str(tmp_path / "after"), f"--text={text_file}",
                   f"--seq_len={SEQ_LEN}", "--json"])
    moved = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tok, _ = checkpoint.load_sparse(ckpt, base=str(tmp_path / "after"))
    expected = gates.evaluate_sparse(model, scoring.windows(tok, text_file.read_text(), SEQ_LEN), SEQ_LEN)
    assert moved["model"] == str(tmp_path / "after") and moved["kl_to_dense"] == pytest.approx(expected["kl_to_dense"])
    sample.main([f"--ckpt={ckpt}", f"--init={tmp_path / 'after'}", "--max_new_tokens=2", "--no_color"])
