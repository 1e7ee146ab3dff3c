"""tests/test_bench_scoring.py — research/tasks.py's benchmarks: multiple choice by log-likelihood,
exact match by greedy generation, answer extraction, on hand-computed numbers and a tiny model.

The tiny model is a random transformers LLaMA saved as a model folder with a word-level
tokenizer (conftest.py); the reference log-likelihoods come from transformers itself.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import gates
import generate
import load_weights
import router
import scoring
from conftest import TOKENIZER_HF, tiny_model_folder
from research import tasks
from test_cli import make_checkpoint


@pytest.fixture(scope="module")
def tiny(tiny_hf, tmp_path_factory):
    """(reference transformers model, model folder) of a tiny LLaMA without BOS."""
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, "llama", adds_bos=False)
    ref, _ = tiny_hf("llama", **TOKENIZER_HF)
    return ref, folder


class CharTokenizer:
    """One id per character: token boundaries are visible, so the split can be checked by eye."""
    bos_id, eos_ids = None, {0}

    def encode(self, text, special=True):
        return [ord(c) for c in text]


# A task in the word-level vocabulary of the tiny tokenizer: prompt = "" + input + " ".
TASK = tasks.Task("tiny", [
    {"input": "the cat sat on the", "target_scores": {"mat": 1, "log": 0, "red dog": 0}},
    {"input": "a dog ran", "target_scores": {"under the log": 0, "and then it was big": 1}},
    {"input": "it was", "target_scores": {"big": 1, "small": 1, "blue": 0, "red": 0}},
], input_prefix="", output_prefix=" ")


def test_encode_pair_moves_trailing_spaces_into_the_continuation():
    ctx, cont = tasks.encode_pair(CharTokenizer(), "\nA:  ", "42")
    assert ctx == [ord(c) for c in "\nA:"]
    assert cont == [ord(c) for c in "  42"]


def test_prompt_uses_the_task_prefixes_and_bigbench_defaults():
    task = tasks.Task("t", [], task_prefix="Add.")
    assert tasks.prompt(task, {"input": "What is 1 plus 2?"}) == "Add.\nQ: What is 1 plus 2?\nA: "


def test_acc_and_acc_norm_by_hand():
    # log-likelihoods -3 ("a", 1 character) and -4 ("bbbb", 4 characters): acc picks "a";
    # per character -3 and -1, so acc_norm picks "bbbb"
    assert tasks.choice_hits([-3.0, -4.0], ["a", "bbbb"], [1, 0]) == (1.0, 0.0)
    assert tasks.choice_hits([-3.0, -4.0], ["a", "bbbb"], [0, 1]) == (0.0, 1.0)
    # two correct choices: either counts
    assert tasks.choice_hits([-1.0, -2.0, -0.5], ["x", "y", "zzzzz"], [1, 0, 1]) == (1.0, 1.0)


def test_mean_and_standard_error():
    p, se = tasks.mean_stderr([1, 0, 0, 1, 1])
    assert p == 0.6 and se == pytest.approx((0.6 * 0.4 / 5) ** 0.5)


def reference_logprob(ref, ids, n_cont):
    """Sum of log p of the last n_cont ids, each given everything before it (transformers)."""
    with torch.no_grad():
        logp = F.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)    # (T, V)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_cont, len(ids)))


def test_continuation_logprobs_match_transformers_in_padded_batches(tiny):
    ref, folder = tiny
    model, tok = load_weights.load(str(folder))
    requests = [tasks.encode_pair(tok, tasks.prompt(TASK, ex), c)
                for ex in TASK.examples for c in ex["target_scores"]]
    assert len({len(a) + len(b) for a, b in requests}) > 2        # batches mix lengths: padding matters
    got = tasks.continuation_logprobs(model, requests, batch_size=4)
    for (ctx, cont), (ll, _) in zip(requests, got):
        assert ll == pytest.approx(reference_logprob(ref, ctx + cont, len(cont)), abs=1e-4)
    one_by_one = tasks.continuation_logprobs(model, requests, batch_size=1)
    assert [g for _, g in got] == [g for _, g in one_by_one]


def test_multiple_choice_picks_the_argmax_of_the_reference(tiny, monkeypatch):
    """Each example's choices get their own log-likelihoods (transformers'), in order, batched
    across examples; the hits are those of these log-likelihoods."""
    ref, folder = tiny
    model, tok = load_weights.load(str(folder))
    seen, real = [], tasks.choice_hits

    def spy(lls, choices, scores):                     # what each example is scored on
        seen.append((list(lls), choices, scores))
        return real(lls, choices, scores)
    monkeypatch.setattr(tasks, "choice_hits", spy)
    hits = tasks.multiple_choice(model, tok, TASK, TASK.examples, batch_size=4)
    assert len(seen) == len(TASK.examples)
    for n, (ex, (got, choices, scores)) in enumerate(zip(TASK.examples, seen)):
        context = tasks.prompt(TASK, ex).rstrip()
        lls = [reference_logprob(ref, tok.encode(context + " " + c), len(tok.encode(c))) for c in ex["target_scores"]]
        assert choices == list(ex["target_scores"]) and scores == list(ex["target_scores"].values())
        assert got == pytest.approx(lls, abs=1e-4)
        assert (hits["acc"][n], hits["acc_norm"][n]) == real(lls, choices, scores)


@pytest.mark.parametrize("text, regex, answer", [
    ("12\n", "[-+]?\\d+", "12"),
    (" -765 is it", "[-+]?\\d+", "-765"),
    ("The sum is 3.5, not 4", None, "3.5"),       # no output_regex: the first number
    ("I do not know", None, ""),
    ("answer: B) four", "[A-D]\\)", "B)"),
])
def test_extract_answer(text, regex, answer):
    assert tasks.extract_answer(text, regex) == answer


def test_cut_at_the_first_stop_string():
    assert tasks.cut_at("12 and\n34 then", ["then", "\n"]) == "12 and"
    assert tasks.cut_at("no stop", ["\n"]) == "no stop"


def test_generate_until_equals_one_prompt_at_a_time(tiny):
    """Batched by length, stopped at a stop string: the same text as greedy decoding alone, cut."""
    _, folder = tiny
    model, tok = load_weights.load(str(folder))
    prompts = [tok.encode(t) for t in ("the cat", "a dog", "the dog sat on", "it was big and then")]
    alone = [generate.generate(model, torch.tensor([p]), 8, eos_ids=tok.eos_ids)[0, len(p):].tolist() for p in prompts]
    alone = [ids[:next((i for i, t in enumerate(ids) if t in tok.eos_ids), len(ids))] for ids in alone]
    until = [tok.decode(alone[0][2:3]), "no such word"]    # the first prompt's third new word stops it
    got = tasks.generate_until(model, tok, prompts, until, max_new_tokens=8, batch_size=2)
    assert got == [tasks.cut_at(tok.decode(ids), until) for ids in alone]
    assert len(got[0]) < len(tok.decode(alone[0])), "the stop string cut nothing: the test checks nothing"


def test_exact_match_scores_the_extracted_answer(tiny, monkeypatch):
    _, folder = tiny
    model, tok = load_weights.load(str(folder))
    task = tasks.Task("sums", [{"input": "x", "target": "7", "target_scores": {"7": 1, "8": 0}},
                                  {"input": "y", "target": "-2", "target_scores": {"-2": 1, "2": 0}},
                                  {"input": "z", "target": ["5", "05"], "target_scores": {"5": 1, "6": 0}}],
                         output_regex="[-+]?\\d+", exact_match=True)
    answers = iter(["7 apples", "2", "it is 05"])
    monkeypatch.setattr(tasks, "generate_until", lambda *a, **k: [next(answers) for _ in range(3)])
    assert tasks.exact_match(model, tok, task, task.examples) == [1.0, 0.0, 1.0]


def test_tasks_cli_json(tiny, tmp_path, capsys):
    _, folder = tiny
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"examples": TASK.examples, "example_input_prefix": "",
                                "example_output_prefix": " "}))
    tasks.main([f"--init={folder}", f"--tasks={path}", "--limit=2", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row, = out["tasks"]
    assert row["task"] == "tiny" and row["examples"] == 2
    assert row["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert set(row) >= {"acc_dense", "acc_dense_stderr", "acc_norm_dense", "acc_norm_dense_stderr"}
    with pytest.raises(ValueError, match="not found"):
        tasks.main([f"--init={folder}", f"--tasks={tmp_path / 'missing.json'}"])


def test_sparse_scores_batched_equal_one_by_one_and_open_gates_equal_dense(tiny, tmp_path):
    """With a checkpoint: padding never changes a sequence's gates; gates open with LoRA B = 0 is
    exactly the dense model; learned gates (about half closed) change the scores."""
    _, folder = tiny
    model, tok, _ = checkpoint.load_sparse(make_checkpoint(tmp_path / "ckpt", folder))
    requests = [tasks.encode_pair(tok, tasks.prompt(TASK, ex), c)
                for ex in TASK.examples for c in ex["target_scores"]]
    dense = [ll for ll, _ in tasks.continuation_logprobs(model, requests, dense=True)]
    sparse = [ll for ll, _ in tasks.continuation_logprobs(model, requests, batch_size=4)]
    alone = [ll for ll, _ in tasks.continuation_logprobs(model, requests, batch_size=1)]
    assert sparse == pytest.approx(alone, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(sparse, dense)) > 1e-2
    with gates.forced(model, "open"):
        assert [ll for ll, _ in tasks.continuation_logprobs(model, requests)] == pytest.approx(dense, abs=1e-5)


def test_tasks_cli_with_checkpoint_reports_dense_and_sparse(tiny, tmp_path, capsys):
    _, folder = tiny
    ckpt = make_checkpoint(tmp_path / "ckpt", folder)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"examples": TASK.examples, "example_input_prefix": "", "example_output_prefix": " "}))
    tasks.main([f"--ckpt={ckpt}", f"--tasks={path}", "--gates=open", "--json"])
    row, = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"]
    assert row["acc_sparse"] == row["acc_dense"] and row["acc_norm_sparse"] == row["acc_norm_dense"]
    with pytest.raises(ValueError, match="--text"):
        tasks.main([f"--ckpt={ckpt}", f"--tasks={path}", "--gates=random"])
    for flag in ("--gates=open", "--path=masked"):        # without --ckpt: nothing to compare with
        with pytest.raises(ValueError, match=f"--tasks with {flag} compares a checkpoint .* pass --ckpt"):
            tasks.main([f"--init={folder}", f"--tasks={path}", flag])


def test_random_gates_on_a_benchmark_take_the_learned_densities_of_text(tiny, tmp_path, monkeypatch):
    _, folder = tiny
    ckpt = make_checkpoint(tmp_path / "ckpt", folder)
    text = tmp_path / "val.txt"
    text.write_text(" ".join(TASK.examples[0]["input"].split() * 40))
    task = tmp_path / "tiny.json"
    task.write_text(json.dumps({"examples": TASK.examples, "example_input_prefix": "", "example_output_prefix": " "}))
    seen, real = {}, tasks.benchmark

    def spy(model, *args, **kwargs):                    # the gates while the task is scored
        seen.update({(layer, kind): (type(r).__name__, r.density) for layer, kind, r in router.routers(model)})
        return real(model, *args, **kwargs)
    monkeypatch.setattr(tasks, "benchmark", spy)
    tasks.main([f"--ckpt={ckpt}", f"--tasks={task}", "--gates=random", f"--text={text}", "--seq_len=16"])
    model, tok, _ = checkpoint.load_sparse(ckpt)
    densities = scoring.gate_stats(model, scoring.windows(tok, text.read_text(), 16)).density()
    assert seen == {key: ("RandomGate", d) for key, d in densities.items()}
    assert 0 < min(densities.values()) and max(densities.values()) < 1     # gates really half open
