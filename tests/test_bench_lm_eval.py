"""tests/test_bench_lm_eval.py — research/lm_eval_adapter.py through lm-evaluation-harness's own task machinery.

Offline: the tasks are YAML files written here (`dataset_path: json`, local `data_files`), on a
tiny random model folder. The reference is lm_eval's own `hf` model (transformers) on the same
folder: per document, the same log-likelihoods, acc and acc_norm, the same rolling perplexity and
the same generated text; and research/tasks.py's own multiple-choice scoring gives the same acc and acc_norm.
Skipped when lm_eval is not installed (it is an optional, dev-only dependency).
"""
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -r requirements-dev.txt")
pytest.importorskip("accelerate", reason="lm_eval's hf reference model needs accelerate: pip install -r requirements-dev.txt")

import load_weights                          # noqa: E402
from conftest import WORDS, tiny_model_folder   # noqa: E402
from lm_eval.tasks import TaskManager        # noqa: E402
from research import tasks as research_tasks   # noqa: E402
from research.lm_eval_adapter import NanoskipLM   # noqa: E402
from test_cli import make_checkpoint         # noqa: E402

REPO = Path(__file__).resolve().parent.parent

FAMILIES = {   # one tokenizer without BOS (like SmolLM2), one that prepends it (like Gemma)
    "llama": dict(),
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=12,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e6),
                                     "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
}
VOCAB_WORDS = WORDS[:18]   # real words of the tiny vocabulary


def docs(n=8, seed=0):
    """Multiple-choice documents: a question, 2 to 4 choices of 1 to 4 words, a label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 4)
        choices = [" ".join(rng.choice(VOCAB_WORDS) for _ in range(rng.randint(1, 4))) + f" w{i}" for i in range(k)]
        out.append(dict(question=" ".join(rng.choice(VOCAB_WORDS) for _ in range(rng.randint(3, 8))),
                        choices=choices, label=rng.randrange(k),
                        text=" ".join(rng.choice(VOCAB_WORDS) for _ in range(90))))   # > 64 tokens: 2 windows
    return out


TASKS = {
    "tiny_mc": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm""",
    "tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity""",
    "tiny_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["log", "it"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match""",
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tiny_hf, tmp_path_factory):
    """(model folder with a tokenizer transformers can load, folder of the three task YAMLs)."""
    folder = tiny_model_folder(tiny_hf, tmp_path_factory, request.param, **FAMILIES[request.param])
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<unk>")))
    tasks = tmp_path_factory.mktemp("tasks")
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs()))
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {tasks / 'docs.jsonl'}\ntest_split: test\n{body}\n")
    return folder, tasks


def run(model, tasks, model_args=None):
    """lm_eval.simple_evaluate on the local tasks: (results, samples) per task."""
    manager = TaskManager(include_path=str(tasks), include_defaults=False)   # ours only: indexing all is slow
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=3,
                                  device="cpu", task_manager=manager, log_samples=True)
    samples = {t: sorted(s, key=lambda x: (x["doc_id"])) for t, s in out["samples"].items()}
    return out["results"], samples


@pytest.fixture(scope="module")
def both(setup):
    folder, tasks = setup
    ref = run("hf", tasks, f"pretrained={folder},dtype=float32")
    ours = run(NanoskipLM(init=str(folder), batch_size=3), tasks)
    return ref, ours


def test_loglikelihoods_acc_and_acc_norm_equal_the_hf_model(both):
    (_, ref), (_, ours) = both
    for r, o in zip(ref["tiny_mc"], ours["tiny_mc"], strict=True):
        assert [ll for ll, _ in o["filtered_resps"]] == pytest.approx([ll for ll, _ in r["filtered_resps"]], abs=1e-4)
        assert (o["acc"], o["acc_norm"]) == (r["acc"], r["acc_norm"])
    accs = {(s["acc"], s["acc_norm"]) for s in ref["tiny_mc"]}
    assert len(accs) > 1, "every document scores the same: the comparison checks nothing"


def test_rolling_perplexity_equals_the_hf_model(both):
    (ref, _), (ours, _) = both
    assert ours["tiny_rolling"]["word_perplexity,none"] == pytest.approx(ref["tiny_rolling"]["word_perplexity,none"],
                                                                         rel=1e-5)


def test_generated_text_equals_the_hf_model(both):
    (_, ref), (_, ours) = both
    got = [s["filtered_resps"][0] for s in ours["tiny_gen"]]
    assert got == [s["filtered_resps"][0] for s in ref["tiny_gen"]]
    assert len({len(g.split()) for g in got}) > 1, "every generation has one length: stopping is not tested"


def test_research_tasks_scores_the_same_documents_the_same_way(setup, both):
    (_, ref), _ = both
    folder, _ = setup
    model, tok = load_weights.load(str(folder))
    task = research_tasks.Task("tiny", [dict(input=d["question"], target_scores={c: int(i == d["label"])
                                                                                for i, c in enumerate(d["choices"])})
                                        for d in docs()], input_prefix="", output_prefix=" ")
    hits = research_tasks.multiple_choice(model, tok, task, task.examples)
    assert hits["acc"] == [s["acc"] for s in ref["tiny_mc"]]
    assert hits["acc_norm"] == [s["acc_norm"] for s in ref["tiny_mc"]]


def requests(*args):
    """Stand-ins for lm_eval Instances: the adapter reads only .args."""
    return [SimpleNamespace(args=a) for a in args]


def test_adapter_sparse_checkpoint_gates(setup, tmp_path):
    """gates=open with LoRA B = 0 answers exactly as the dense base; learned gates do not."""
    folder, _ = setup
    ckpt = make_checkpoint(tmp_path / "ckpt", folder)
    pairs = requests(("the cat sat on the", " mat"), ("a dog", " ran under the log"), ("", "it was big"))
    dense = NanoskipLM(init=str(folder)).loglikelihood(pairs, disable_tqdm=True)
    opened = NanoskipLM(ckpt=str(ckpt), gates="open").loglikelihood(pairs, disable_tqdm=True)
    learned = NanoskipLM(ckpt=str(ckpt)).loglikelihood(pairs, disable_tqdm=True)
    assert [ll for ll, _ in opened] == pytest.approx([ll for ll, _ in dense], abs=1e-5)
    assert max(abs(a[0] - b[0]) for a, b in zip(learned, dense)) > 1e-2
    with pytest.raises(ValueError, match="ckpt"):
        NanoskipLM(init=str(folder), gates="open")


def test_command_line_is_lm_evals_with_nanoskip_registered(setup, tmp_path):
    folder, tasks = setup
    p = subprocess.run([sys.executable, "-m", "research.lm_eval_adapter", "--model", "nanoskip",
                        "--model_args", f"init={folder}", "--tasks", "tiny_mc", "--include_path", str(tasks),
                        "--device", "cpu", "--limit", "4", "--output_path", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(next(tmp_path.rglob("results*.json")).read_text())["results"]["tiny_mc"]
    assert {"acc,none", "acc_norm,none"} <= set(result)
