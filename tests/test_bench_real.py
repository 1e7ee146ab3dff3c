"""A real BIG-bench task on the real models: research/tasks.py, lm_eval's hf model and the nanoskip adapter agree.

    python -m pytest -m real tests/test_bench_real.py

The first 20 examples of general_knowledge (data/benchmarks/bigbench) become a local
lm_eval task: one JSON line per example, `question` = research.tasks' prompt without its trailing space
(lm_eval's target_delimiter " " puts it back in front of the choice), `choices` = the keys of
target_scores, `gold` = the indices of the highest scores. Per example, acc and acc_norm are the
same in all three; the log-likelihoods of lm_eval's two models agree to 1e-3.
"""
import json
from pathlib import Path

import pytest

import load_weights
from conftest import real_checkpoint
from research import tasks

pytestmark = pytest.mark.real
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -r requirements-dev.txt")
pytest.importorskip("accelerate", reason="lm_eval's hf model needs accelerate: pip install -r requirements-dev.txt")
from lm_eval.tasks import TaskManager        # noqa: E402
from research.lm_eval_adapter import NanoskipLM   # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASK_FILE = REPO / "data" / "benchmarks" / "bigbench" / "general_knowledge.json"
N = 20


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma-3-270m"])
def folder(request):
    """The preset's real weights, found by name (conftest.real_checkpoint); both sides load them in float32."""
    return real_checkpoint(request.param)


def lm_eval_task(task, tmp_path) -> TaskManager:
    """The task's first N examples as a local multiple-choice task named bb_local."""
    rows = []
    for ex in task.examples[:N]:
        scores = list(ex["target_scores"].values())
        rows.append(dict(question=tasks.prompt(task, ex).rstrip(" "), choices=list(ex["target_scores"]),
                         gold=[i for i, s in enumerate(scores) if s == max(scores)]))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bb_local.yaml").write_text(
        f"task: bb_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return TaskManager(include_path=str(tmp_path), include_defaults=False)


def samples(model, manager, model_args=None):
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["bb_local"], batch_size=8,
                                  device="cpu", task_manager=manager, log_samples=True)
    return sorted(out["samples"]["bb_local"], key=lambda s: s["doc_id"])


def test_tasks_hf_and_adapter_agree_on_general_knowledge(folder, tmp_path):
    task = tasks.read_task(TASK_FILE)
    manager = lm_eval_task(task, tmp_path)
    ref = samples("hf", manager, f"pretrained={folder},dtype=float32")
    ours = samples(NanoskipLM(init=str(folder), batch_size=8), manager)
    model, tok = load_weights.load(str(folder))
    hits = tasks.multiple_choice(model, tok, task, task.examples[:N])
    for r, o in zip(ref, ours, strict=True):
        assert [ll for ll, _ in o["filtered_resps"]] == pytest.approx([ll for ll, _ in r["filtered_resps"]], abs=1e-3)
    assert hits["acc"] == [s["acc"] for s in ref] == [s["acc"] for s in ours]
    assert hits["acc_norm"] == [s["acc_norm"] for s in ref] == [s["acc_norm"] for s in ours]
