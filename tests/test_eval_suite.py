"""The suite: staged evaluation with stable steps, splits, weighted score/objectives, errors that propagate."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluators import EvalError, NonFiniteError
from evaluators.suite import Suite
from evaluators.tasks import parse_evaluation_block
from scripts.bench_eval import write_task
from test_eval_native import gen_rows, mc_rows


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A study folder: the evaluation block's JSONL files (and an lm-eval YAML over the same MC rows)."""
    folder = tmp_path_factory.mktemp("study")
    rows = mc_rows(30)
    write_task(rows, folder, task="mc_lm")
    (folder / "mc.jsonl").write_text((folder / "mc_lm.jsonl").read_text())
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen_rows(10)))
    (folder / "ppl.jsonl").write_text("".join(json.dumps({"text": f"rev {w} = {w[::-1]}"}) + "\n"
                                              for w in ["abc", "hello", "xyz", "stack", "merge", "q", "tiny", "model", "soup", "ab",
                                                        "optuna", "zoo"]))
    return folder


def block(**extra):
    return {"tasks": [{"name": "mc", "kind": "multiple_choice", "path": "mc.jsonl", "weight": 2.0},
                      {"name": "gen", "kind": "generate", "path": "gen.jsonl", "max_new_tokens": 6},
                      {"name": "ppl", "kind": "perplexity", "path": "ppl.jsonl", "weight": 0.5},
                      {"name": "mc_lm", "kind": "lm_eval", "task": "mc_lm", "include_path": "."}], **extra}


@pytest.fixture(scope="module")
def model_and_tok(zoo):
    return AutoModelForCausalLM.from_pretrained(zoo["ft_add"]).eval(), AutoTokenizer.from_pretrained(zoo["ft_add"])


def make_suite(study_dir, tok, **extra):
    return Suite.from_config(parse_evaluation_block(block(**extra), base_dir=study_dir), tok, batch_size=8)


def test_staged_callback_sees_every_item_once_with_stable_steps(study_dir, model_and_tok):
    model, tok = model_and_tok
    suite = make_suite(study_dir, tok, holdout=0.4, seed=1)
    steps = suite.steps("search")
    assert [s for s, _, _ in steps] == list(range(suite.size("search")))
    assert steps == make_suite(study_dir, tok, holdout=0.4, seed=1).steps("search")  # another worker agrees
    seen, tasks_in_order = {}, []

    def callback(progress):
        tasks_in_order.append(progress.task)
        for step, value in progress.new:
            assert step not in seen
            seen[step] = value
        assert progress.done == len(seen) and progress.total == len(steps)
        assert progress.result.task(progress.task).n > 0

    result = suite.evaluate(model, split="search", callback=callback, chunk_size=3)
    assert sorted(seen) == list(range(len(steps)))
    assert tasks_in_order[:4] == ["mc", "gen", "ppl", "mc_lm"]  # tasks take turns: early chunks cover every task
    for step, task, item_id in steps:
        assert result.task(task).per_item[item_id] == seen[step]
    again = {}
    suite.evaluate(model, split="search", callback=lambda p: again.update(p.new), chunk_size=5)
    assert again == pytest.approx(seen, abs=1e-5)  # same items, same steps, same scores next trial


def test_result_scores_splits_and_pairing(study_dir, model_and_tok):
    model, tok = model_and_tok
    suite = make_suite(study_dir, tok, holdout=0.4, seed=1)
    search, holdout = suite.evaluate(model, split="search"), suite.evaluate(model, split="holdout")
    every = suite.evaluate(model, split="all")
    for name in ["mc", "gen", "ppl", "mc_lm"]:
        s, h, a = (r.task(name).per_item for r in (search, holdout, every))
        assert s and h and not set(s) & set(h) and {**s, **h} == pytest.approx(a)
    # the native task and lm-eval over the same rows pair item by item, and agree
    assert search.task("mc").per_item == search.task("mc_lm").per_item
    tasks = search.tasks
    assert [t.name for t in tasks] == ["mc", "gen", "ppl", "mc_lm"] and search.objectives == [t.score for t in tasks]
    assert search.score == pytest.approx((2 * tasks[0].score + tasks[1].score + 0.5 * tasks[2].score
                                          + tasks[3].score) / 4.5)
    mc = tasks[0]
    values = list(mc.per_item.values())
    assert mc.score == pytest.approx(sum(values) / len(values)) and mc.n == len(values) and mc.metric == "acc"
    assert tasks[2].metric == "neg_nll" and tasks[2].score < 0 and tasks[1].metric == "exact_match"
    assert json.loads(json.dumps(search.to_dict(), allow_nan=False))["tasks"][0]["name"] == "mc"


def test_limit_applies_per_split(study_dir, model_and_tok):
    _, tok = model_and_tok
    raw = block(holdout=0.5)
    raw["tasks"] = [{**raw["tasks"][0], "limit": 4}]
    suite = Suite.from_config(parse_evaluation_block(raw, base_dir=study_dir), tok)
    assert suite.size("search") == 4 and suite.size("holdout") == 4 and suite.size("all") == 8


def test_callback_exceptions_propagate_unchanged(study_dir, model_and_tok):
    model, tok = model_and_tok
    suite = make_suite(study_dir, tok)
    calls = []

    def prune(progress):
        calls.append(progress.done)
        raise Stop(progress.done)

    with pytest.raises(Stop):
        suite.evaluate(model, callback=prune, chunk_size=2)
    assert calls == [2]


def test_errors(study_dir, model_and_tok, zoo):
    model, tok = model_and_tok
    suite = make_suite(study_dir, tok)
    with pytest.raises(EvalError, match="holdout is 0"):
        suite.evaluate(model, split="holdout")
    with pytest.raises(EvalError, match="split"):
        suite.evaluate(model, split="test")
    with pytest.raises(EvalError, match="the model is on cpu"):
        Suite.from_config(parse_evaluation_block(block(), base_dir=study_dir), tok, device="cuda").evaluate(model)
    broken = AutoModelForCausalLM.from_pretrained(zoo["base"]).eval()
    with torch.no_grad():
        broken.model.norm.weight.fill_(math.inf)
    with pytest.raises(NonFiniteError):
        suite.evaluate(broken)
