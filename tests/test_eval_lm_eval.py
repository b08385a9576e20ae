"""The lm-eval bridge: local task YAMLs on the live model, per-item scores under stable ids, in-place weights seen."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import EvalError
from evaluators.lm_eval_adapter import LmEvalBridge
from evaluators.native import MultipleChoiceScorer
from evaluators.tasks import TaskSpec, parse_row
from scripts.bench_eval import write_task
from test_eval_native import mc_rows

LL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: query
doc_to_target: answer
metric_list:
  - metric: perplexity
"""


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def spec(task, folder, **kw):
    return TaskSpec.from_dict({"kind": "lm_eval", "task": task, "include_path": str(folder), **kw})


def write_ll_task(folder, name, rows):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(LL_TASK.format(name=name, data=data))


def ll_rows(n=12):
    return [{"query": f"{i}+{i}=", "answer": str(2 * i)} for i in range(n)]


def test_local_multiple_choice_task_pairs_with_native_by_id(zoo, tmp_path):
    model, tok = load(zoo["ft_add"])
    rows = mc_rows(20)
    write_task(rows, tmp_path, task="pair_mc")
    task = LmEvalBridge(tok, batch_size=8).load(spec("pair_mc", tmp_path, metric="acc_norm"))
    assert task.ids == [r["id"] for r in rows] and task.metric == "acc_norm"
    which = [5, 0, 13, 21]
    got = task.score(model, which)
    items = [parse_row("multiple_choice", r, "x") for r in rows]
    native = MultipleChoiceScorer(items, tok).score(model, which)
    assert [g["acc_norm"] for g in got] == [n["acc_norm"] for n in native]


def test_content_ids_survive_reordering(zoo, tmp_path):
    model, tok = load(zoo["ft_add"])
    rows = ll_rows()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    write_ll_task(tmp_path / "a", "ll_a", rows)
    write_ll_task(tmp_path / "b", "ll_b", rows[::-1])
    bridge = LmEvalBridge(tok)
    a, b = bridge.load(spec("ll_a", tmp_path / "a")), bridge.load(spec("ll_b", tmp_path / "b"))
    assert a.ids == b.ids[::-1] and len(set(a.ids)) == len(rows)
    score_a = dict(zip(a.ids, (s["perplexity"] for s in a.score(model, range(len(rows)))), strict=True))
    score_b = dict(zip(b.ids, (s["perplexity"] for s in b.score(model, range(len(rows)))), strict=True))
    assert score_a == pytest.approx(score_b, abs=1e-5)
    unsorted = [9, 2, 7, 0]  # lm-eval 0.4 mislabels doc_ids when `samples` is not sorted: the bridge sorts
    assert [s["perplexity"] for s in a.score(model, unsorted)] == pytest.approx([score_a[a.ids[i]] for i in unsorted])


def test_in_place_weight_changes_are_seen(zoo, tmp_path):
    model, tok = load(zoo["base"])
    write_ll_task(tmp_path, "ll", ll_rows())
    bridge = LmEvalBridge(tok)
    task = bridge.load(spec("ll", tmp_path))
    before = [s["perplexity"] for s in task.score(model, range(12))]
    lm = bridge.lm(model)
    other, _ = load(zoo["ft_add"])
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.copy_(q)
    after = [s["perplexity"] for s in task.score(model, range(12))]
    assert bridge.lm(model) is lm  # the same HFLM around the same live model
    assert after != pytest.approx(before, abs=1e-3)
    fresh = LmEvalBridge(tok).load(spec("ll", tmp_path))
    assert after == pytest.approx([s["perplexity"] for s in fresh.score(other, range(12))], abs=1e-5)


def test_group_pools_its_leaf_tasks(zoo, tmp_path):
    model, tok = load(zoo["base"])
    write_ll_task(tmp_path, "leaf_one", ll_rows(3))
    write_ll_task(tmp_path, "leaf_two", ll_rows(5))
    (tmp_path / "group.yaml").write_text("group: both\ntask:\n  - leaf_one\n  - leaf_two\n")
    task = LmEvalBridge(tok).load(spec("both", tmp_path))
    assert len(task.ids) == 8 and task.ids[0].startswith("leaf_one/") and task.ids[-1].startswith("leaf_two/")
    values = task.score(model, [7, 0])
    assert len(values) == 2 and all(v["perplexity"] < 0 for v in values)
    assert task.score(model, [7])[0]["perplexity"] == pytest.approx(values[0]["perplexity"])  # one leaf only


def test_errors(zoo, tmp_path):
    _, tok = load(zoo["base"])
    write_ll_task(tmp_path, "ll", ll_rows(2))
    bridge = LmEvalBridge(tok)
    with pytest.raises(EvalError, match="has no metric 'acc'"):
        bridge.load(spec("ll", tmp_path, metric="acc"))
    with pytest.raises(EvalError, match="include_path"):
        bridge.load(spec("ll", tmp_path / "missing"))
