"""tests/test_eval_suite.py — research/suite.py (one table), --gates=peek for research/tasks.py, and
what skips (research/studies.py: token classes, density by class and by position).

Hand-made pieces and gate records check the definitions; tiny model folders (conftest.py) with a
fabricated checkpoint (test_cli.make_checkpoint: random routers, about half the gates closed)
check that the numbers agree with evaluate.py's own perplexity evaluation (gates.evaluate_sparse).
No wall-clock thresholds: timings are only checked for being what their ratios say.
"""
import json
import xml.etree.ElementTree as ET

import pytest
import torch

import checkpoint
import gates
import lora
import router
import scoring
from conftest import TINY, tiny_model_folder, word_text_file
from flops import compute_ratio
from model import ModelConfig
from research import studies, suite, tasks
from test_cli import FAMILIES, make_checkpoint

SEQ_LEN = 16
C = {c: i for i, c in enumerate(studies.CLASSES)}


def members(row) -> set:
    return {c for c in studies.CLASSES if row[C[c]]}


# ----------------------------------------------------------------------------------------------
# Token classes, by hand
# ----------------------------------------------------------------------------------------------

def test_token_classes_of_hand_made_pieces():
    pieces = ["Hello", " world", ",", " the", "ory", " the", " 42", "\n",           # line 0: prose
              ">>>", " x", " =", " 1", "\n",                                       # line 1: a doctest
              "  ", "\n",                                                          # line 2: blank
              "run", "ning", "\ufffd", "2x"]                                       # line 3: prose
    got = [members(row) - {"all"} for row in studies.classify(pieces)]
    expected = [
        {"word start", "prose"}, {"word start", "prose"}, {"punctuation", "prose"},
        {"word start", "prose"},                              # " the" of " theory": no function word
        {"word continuation", "prose"},
        {"word start", "function word", "prose"}, {"digit", "prose"},
        {"whitespace", "newline", "prose"},                   # the newline ends line 0
        {"punctuation", "code"}, {"word start", "code"}, {"punctuation", "code"}, {"digit", "code"},
        {"whitespace", "newline", "code"},
        {"whitespace", "prose"}, {"whitespace", "newline", "prose"},
        {"word start", "prose"},                              # after a newline
        {"word continuation", "prose"}, {"other", "prose"}, {"other", "prose"},
    ]
    assert got == expected
    assert all(row[C["all"]] and not row[C["sink"]] for row in studies.classify(pieces))


def test_code_lines_are_fences_and_doctest_blocks():
    lines = ["Some prose:", "```python", "x = 1", "", "y = 2", "```", "after",
             ">>> f(1)", "2", "", "    indented prose"]
    assert studies.code_lines(lines) == [False, True, True, True, True, True, False, True, True, False, False]


class CharTokenizer:
    """One id per character; id 1 is BOS."""
    bos_id = 1

    def decode(self, ids):
        return "".join("<bos>" if i == 1 else chr(i) for i in ids)


def test_window_classes_make_position_0_and_bos_sinks_only():
    text = [ord(c) for c in "ab 1\ncd e."]                               # 10 characters, 2 windows of 5
    plain = torch.tensor(text).view(2, 5)
    with_bos = torch.cat([torch.ones(2, 1, dtype=torch.long), plain], dim=1)
    for chunks, bos in ((plain, False), (with_bos, True)):
        member = studies.window_classes(CharTokenizer(), chunks, bos)     # (2, L, classes)
        assert member.shape == (*chunks.shape, len(studies.CLASSES))
        assert member[..., C["all"]].all()
        assert member[:, 0, C["sink"]].all() and not member[:, 1:, C["sink"]].any()
        assert [members(r) for r in member[:, 0]] == [{"all", "sink"}] * 2
    # the text is classified as a whole: "c" opens window 2 after "\n" (a word start), "1" is a digit
    member = studies.window_classes(CharTokenizer(), with_bos, True)
    assert "word start" in members(member[1, 1])                       # "c": after the newline
    assert members(member[0, 4]) == {"all", "digit", "prose"}          # "1"


# ----------------------------------------------------------------------------------------------
# Densities per group, by hand
# ----------------------------------------------------------------------------------------------

def test_density_by_group_and_position_by_hand():
    cfg = ModelConfig(**TINY)                                           # 2 layers; only layer 0 routed here
    keep = {"attn": torch.tensor([[1, 1, 0, 1]]), "mlp": torch.tensor([[1, 0, 0, 1]])}
    records = [router.GateRecord(0, k, None, v.bool()) for k, v in keep.items()]
    member = torch.tensor([[[1, 0], [1, 0], [0, 1], [0, 1]]], dtype=torch.bool)   # (1, 4, 2): A = {0, 1}, B = {2, 3}
    stats = [router.GateStats(), router.GateStats()]
    studies.add_groups(stats, records, member)
    studies.add_groups(stats, records, member)                            # a second pass counts too
    assert stats[0].density() == {(0, "attn"): 1.0, (0, "mlp"): 0.5}
    assert stats[1].density() == {(0, "attn"): 0.5, (0, "mlp"): 0.5}
    w = studies.skip_savings(cfg, 4)
    row = studies.group_row("B", stats[1], tokens=4, total=8, cfg=cfg, seq_len=4)
    assert row["share"] == 0.5
    assert row["density"] == pytest.approx((w["attn"] * 0.5 + w["mlp"] * 0.5) / (w["attn"] + w["mlp"]))
    assert row["density_attn"] == pytest.approx((0.5 + 1) / 2)         # layer 1 is not routed: 1
    assert row["per_layer"] == [{"layer": 0, "attn": 0.5, "mlp": 0.5}, {"layer": 1, "attn": 1.0, "mlp": 1.0}]
    assert studies.group_row("none", router.GateStats(), 0, 8, cfg, 4)["density"] is None


def test_position_buckets():
    assert studies.position_buckets(600) == [(0, 1), (1, 16), (16, 64), (64, 256), (256, 512), (512, 600)]
    assert studies.position_buckets(2048)[-2:] == [(512, 1024), (1024, 2048)]
    assert studies.position_buckets(10) == [(0, 1), (1, 10)]
    assert [studies.bucket_name(*b) for b in studies.position_buckets(20)] == ["0", "1-15", "16-19"]
    member = studies.position_members(20)                                 # (20, 3)
    assert member.sum(1).eq(1).all() and member.sum(0).tolist() == [1, 15, 4]


# ----------------------------------------------------------------------------------------------
# On a tiny checkpoint
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("llama", False), ("gemma3_text", True)], ids=["llama", "gemma3"])
def ckpt(request, tiny_hf, tmp_path_factory):
    """(checkpoint, its base folder, adds BOS): routers about half closed, LoRA B nonzero."""
    family, bos = request.param
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, family, bos, **FAMILIES[family])
    return make_checkpoint(tmp_path_factory.mktemp(f"{family}_suite") / "ckpt", folder, lora_std=0.3), folder, bos


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return word_text_file(tmp_path_factory, "suite", 400, seed=1)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """A multiple-choice task with exact-match targets, in the tiny vocabulary."""
    path = tmp_path_factory.mktemp("task") / "tiny.json"
    examples = [{"input": "the cat sat on the", "target_scores": {"mat": 1, "log": 0}, "target": "mat"},
                {"input": "a dog ran under the", "target_scores": {"log": 1, "red dog": 0}, "target": "log"},
                {"input": "it was", "target_scores": {"big": 1, "blue": 0}, "target": "big"}]
    path.write_text(json.dumps({"examples": examples, "example_input_prefix": "", "example_output_prefix": " ",
                                "preferred_score": "exact_str_match", "output_regex": "[a-z]+"}))
    return path


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_by_class_and_position_agree_with_the_perplexity_eval(ckpt, text_file, tmp_path, capsys):
    ck, _, bos = ckpt
    svg = tmp_path / "classes.svg"
    studies.main([f"--ckpt={ck}", f"--text={text_file}", f"--seq_len={SEQ_LEN}", "--by_class", "--by_position",
                  f"--plot={svg}", "--json"])
    out = last_json(capsys)
    model, tok, _ = checkpoint.load_sparse(ck)
    chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
    ref = gates.evaluate_sparse(model, chunks, SEQ_LEN)
    rows = {r["name"]: r for r in out["classes"]}
    everything = rows["all"]
    T = chunks.shape[1] - 1                                             # input positions per window
    assert everything["tokens"] == len(chunks) * T
    assert everything["density_attn"] == pytest.approx(ref["density_attn"])
    assert everything["density_mlp"] == pytest.approx(ref["density_mlp"])
    assert everything["per_layer"] == ref["per_layer"]
    assert rows["sink"]["tokens"] == len(chunks) and rows["sink"]["density"] == 1     # position 0 (BOS or not)
    assert sum(rows[k]["tokens"] for k in studies.KINDS) == everything["tokens"] - len(chunks)
    assert rows["code"]["tokens"] + rows["prose"]["tokens"] == everything["tokens"] - len(chunks)
    assert rows["word start"]["tokens"] > 0 and rows["function word"]["tokens"] > 0
    # the buckets split the positions: their token-weighted densities average to the whole
    pos = out["positions"]
    assert [p["name"] for p in pos] == ["0", f"1-{T - 1}"]
    assert sum(p["tokens"] for p in pos) == everything["tokens"]
    for key in ("density_attn", "density_mlp", "density"):                # every kind, and FLOP-weighted
        assert sum(p["tokens"] * p[key] for p in pos) / everything["tokens"] == pytest.approx(everything[key]), key
    assert pos[0]["density"] == 1 and 0 < pos[1]["compute_ratio"] < 1
    root = ET.parse(svg).getroot()
    shown = sum(1 for r in out["classes"] + pos if r["tokens"])
    cells = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("height") == "15"]
    assert len(cells) == shown * 2 * model.cfg.n_layers                 # group x (attn, mlp) x layer


def test_a_model_without_routers_has_nothing_to_study(ckpt, text_file):
    _, folder, _ = ckpt
    with pytest.raises(ValueError, match="no routers"):
        studies.main([f"--init={folder}", f"--text={text_file}", f"--seq_len={SEQ_LEN}", "--by_position"])


def test_studies_need_a_text_and_something_to_study(ckpt, text_file):
    ck, _, _ = ckpt
    with pytest.raises(ValueError, match="nothing to study: pass --by_class, --by_position or both"):
        studies.main([f"--ckpt={ck}", f"--text={text_file}"])
    with pytest.raises(ValueError, match="research.studies needs --text=FILE"):
        studies.main([f"--ckpt={ck}", "--by_class"])


def test_suite_table_keys_and_ratios(ckpt, text_file, task_file, capsys):
    ck, _, _ = ckpt
    suite.main([f"--ckpt={ck}", f"--text={text_file}", f"--seq_len={SEQ_LEN}", f"--tasks={task_file}",
                "--repeat=1", "--decode_tokens=4", "--max_new_tokens=3", "--json"])
    printed = capsys.readouterr().out
    out = json.loads(printed.strip().splitlines()[-1])
    model, tok, _ = checkpoint.load_sparse(ck)
    ref = gates.evaluate_sparse(model, scoring.windows(tok, text_file.read_text(), SEQ_LEN), SEQ_LEN)
    for key in ("perplexity", "dense_perplexity", "kl_to_dense", "top1_agreement", "compute_ratio", "density"):
        assert out[key] == pytest.approx(ref[key], rel=1e-6), key
    assert out["perplexity_ratio"] == pytest.approx(out["perplexity"] / out["dense_perplexity"])
    assert "speedup" not in out                                         # one speed: the timed one
    for mode, queries in (("prefill", None), ("decode", 4)):
        b = out[mode]
        assert b["gates"] == "learned" and b["new_tokens"] == queries
        assert out[f"{mode}_speedup"] == b["speedup"] == pytest.approx(b["dense_s"] / b["sparse_s"])
        assert b["efficiency"] == pytest.approx(b["speedup"] / b["ideal_speedup"])
        assert 0 < b["density"] < 1 and b["ideal_speedup"] > 1
    assert out["prefill"]["seq_len"] == SEQ_LEN and out["decode"]["seq_len"] == SEQ_LEN + 4
    task, = out["tasks"]
    for metric in ("acc", "acc_norm", "exact_match"):
        assert {f"{metric}_dense", f"{metric}_sparse", f"{metric}_sparse_stderr"} <= set(task)
    assert 0 < task["density_sparse"] < 1 and 0 < task["compute_ratio_sparse"] < 1
    for label in ("prefill 1 x 16 tokens", "decode 4 tokens after 16", "perplexity", "KL", "top-1",
                  "tiny acc (n=3", "tiny exact_match"):
        assert f"| {label}" in printed, label


def test_suite_with_peek_gates_has_no_speed_and_lands_on_its_target(ckpt, text_file, capsys):
    ck, _, _ = ckpt
    suite.main([f"--ckpt={ck}", f"--text={text_file}", f"--seq_len={SEQ_LEN}", "--gates=peek",
                "--target_compute=0.8", "--json"])
    printed = capsys.readouterr().out
    out = json.loads(printed.strip().splitlines()[-1])
    assert out["prefill"] is out["decode"] is out["prefill_speedup"] is out["decode_speedup"] is None
    assert out["path"] == "masked" and out["compute_ratio"] == pytest.approx(0.8, abs=0.005)
    assert "not timed: peek gates" in printed


def test_suite_needs_a_checkpoint_or_peek(ckpt, text_file):
    _, folder, _ = ckpt
    with pytest.raises(ValueError, match="research.suite compares a sparse checkpoint"):
        suite.main([f"--init={folder}", f"--text={text_file}"])
    with pytest.raises(ValueError, match="research.suite needs --text"):
        suite.main([f"--ckpt={ckpt[0]}", "--tasks=x.json"])


# ----------------------------------------------------------------------------------------------
# --gates=peek for research.tasks
# ----------------------------------------------------------------------------------------------

def test_peek_gates_for_tasks_land_on_their_target_compute(ckpt, text_file, task_file, capsys):
    """The threshold is chosen on --text for --target_compute; multiple choice and generation then
    run on the masked path with the base weights (LoRA off) and the routers are restored after."""
    ck, _, _ = ckpt
    model, tok, _ = checkpoint.load_sparse(ck)
    chunks = scoring.windows(tok, text_file.read_text(), SEQ_LEN)
    with gates.gates_as(model, chunks, SEQ_LEN, "peek", target_compute=0.8) as path:
        assert path == "masked" and not any(m.enabled for m in lora.adapters(model))
        assert router.routers(model) == [] and model._forward_hooks     # every router swapped for the peek rule
        stats = scoring.gate_stats(model, chunks, path="masked")
        assert compute_ratio(model.cfg, SEQ_LEN, stats.density()) == pytest.approx(0.8, abs=0.005)
        row = tasks.benchmark(model, tok, tasks.read_task(task_file), variants=("dense", "sparse"),
                              max_new_tokens=3, path=path)
    assert all(isinstance(r, router.Router) for _, _, r in router.routers(model))   # restored after
    assert all(m.enabled for m in lora.adapters(model))
    assert 0 < row["density_sparse"] < 1 and 0 < row["compute_ratio_sparse"] < 1
    assert {"acc_sparse", "acc_norm_sparse", "exact_match_sparse"} <= set(row)
    tasks.main([f"--ckpt={ck}", f"--tasks={task_file}", "--gates=peek", f"--text={text_file}",
                f"--seq_len={SEQ_LEN}", "--target_compute=0.8", "--max_new_tokens=3", "--json"])
    out = last_json(capsys)
    assert out["gates"] == "peek" and out["tasks"] == [row]             # the command gives the same row
    with pytest.raises(ValueError, match="--gates=peek needs --text"):
        tasks.main([f"--ckpt={ck}", f"--tasks={task_file}", "--gates=peek"])


def test_masked_generation_without_cache_equals_cached_decoding(ckpt):
    """The uncached masked decoding that peek gates need gives the tokens of cached decoding when
    both run the same gates: all open, and all closed (only the sinks compute)."""
    ck, _, _ = ckpt
    model, tok, _ = checkpoint.load_sparse(ck)
    prompts = [tok.encode("the cat sat on the"), tok.encode("a dog ran"), tok.encode("it was big")]
    logits = []
    for forced in ("open", 0.0):
        with gates.forced(model, forced):
            cached = tasks.generate_until(model, tok, prompts, ("\n",), max_new_tokens=6)
            masked = tasks.generate_until(model, tok, prompts, ("\n",), max_new_tokens=6, path="masked")
            with torch.no_grad():
                logits.append(model(torch.tensor([prompts[0]]))[0])
        assert masked == cached and all(cached)
    assert (logits[0] - logits[1]).abs().max() > 1e-3                    # closed gates change the model
