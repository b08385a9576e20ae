"""Task specs, JSONL validation with file:LINE errors, stable ids, seeded subsets and the holdout split."""

import json
import random

import pytest

from evaluators import EvalError
from evaluators.tasks import (
    MultipleChoiceItem,
    TaskSpec,
    load_items,
    parse_evaluation_block,
    parse_task_arg,
    select_split,
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def mc_rows(n):
    return [{"query": f"{i}+1=", "choices": [str(i + 1), str(i + 2)], "gold": 0} for i in range(n)]


def spec(kind, path, **kw):
    return TaskSpec.from_dict({"kind": kind, "path": str(path), **kw})


# --- specs -------------------------------------------------------------------------------------------------

def test_spec_defaults_and_relative_path(tmp_path):
    s = TaskSpec.from_dict({"kind": "multiple_choice", "path": "data/math.jsonl", "limit": 8}, base_dir=tmp_path)
    assert s.path == tmp_path / "data/math.jsonl"
    assert (s.name, s.metric, s.weight, s.limit) == ("math", "acc", 1.0, 8)
    g = TaskSpec.from_dict({"kind": "generate", "path": "/abs/copy.jsonl", "max_new_tokens": 5}, base_dir=tmp_path)
    assert str(g.path) == "/abs/copy.jsonl" and g.max_new_tokens == 5 and g.metric == "exact_match"
    lm = TaskSpec.from_dict({"kind": "lm_eval", "task": "arc_easy", "include_path": "tasks"}, base_dir=tmp_path)
    assert lm.name == "arc_easy" and lm.include_path == tmp_path / "tasks" and lm.metric is None


@pytest.mark.parametrize("raw, field", [
    ({"kind": "multiple_choice", "path": "x.jsonl", "limt": 3}, "task"),
    ({"kind": "multiple-choice", "path": "x.jsonl"}, "task.kind"),
    ({"kind": "generate"}, "task.path"),
    ({"kind": "lm_eval"}, "task.task"),
    ({"kind": "lm_eval", "task": "arc_easy", "path": "x.jsonl"}, "task.path"),
    ({"kind": "perplexity", "path": "x.jsonl", "task": "arc"}, "task.task"),
    ({"kind": "multiple_choice", "path": "x.jsonl", "limit": 0}, "task.limit"),
    ({"kind": "multiple_choice", "path": "x.jsonl", "limit": True}, "task.limit"),
    ({"kind": "multiple_choice", "path": "x.jsonl", "weight": -1}, "task.weight"),
    ({"kind": "multiple_choice", "path": "x.jsonl", "metric": "f1"}, "task.metric"),
    ({"kind": "perplexity", "path": "x.jsonl", "metric": "acc"}, "task.metric"),
    ({"kind": "generate", "path": "x.jsonl", "max_new_tokens": 0}, "task.max_new_tokens"),
])
def test_spec_errors_name_the_field(raw, field):
    with pytest.raises(EvalError) as err:
        TaskSpec.from_dict(raw)
    assert err.value.where == field


def test_evaluation_block(tmp_path):
    cfg = parse_evaluation_block({"tasks": [{"name": "a", "kind": "perplexity", "path": "a.jsonl"},
                                            {"kind": "lm_eval", "task": "arc_easy", "limit": 100}],
                                  "holdout": 0.5, "seed": 3}, base_dir=tmp_path)
    assert [t.name for t in cfg.tasks] == ["a", "arc_easy"] and (cfg.holdout, cfg.seed) == (0.5, 3)
    assert cfg.tasks[0].path == tmp_path / "a.jsonl"
    cases = [({"tasks": []}, "evaluation.tasks"),
             ({"tasks": [{"kind": "perplexity", "path": "a.jsonl"}], "holdout": 1.0}, "evaluation.holdout"),
             ({"tasks": [{"kind": "perplexity", "path": "a.jsonl"}], "seed": "x"}, "evaluation.seed"),
             ({"tasks": [{"kind": "perplexity", "path": "a.jsonl"}], "extra": 1}, "evaluation"),
             ({"tasks": [{"kind": "perplexity", "path": "a.jsonl"}, {"kind": "perplexity", "path": "b.jsonl",
                                                                       "limit": -2}]}, "evaluation.tasks[1].limit"),
             ({"tasks": [{"kind": "perplexity", "path": "a.jsonl"}, {"kind": "generate", "path": "a.jsonl"}]},
              "evaluation.tasks")]
    for block, where in cases:
        with pytest.raises(EvalError) as err:
            parse_evaluation_block(block)
        assert err.value.where == where, block


def test_task_args(tmp_path):
    s = parse_task_arg("multiple_choice:data/math.jsonl:64", tmp_path)
    assert (s.kind, s.path, s.limit) == ("multiple_choice", tmp_path / "data/math.jsonl", 64)
    assert parse_task_arg("generate:copy.jsonl", tmp_path).limit is None
    lm = parse_task_arg("lm_eval:arc_easy:100")
    assert (lm.kind, lm.task, lm.limit) == ("lm_eval", "arc_easy", 100)
    for bad in ["multiple_choice", "nope:x.jsonl", "multiple_choice:"]:
        with pytest.raises(EvalError):
            parse_task_arg(bad)


# --- rows --------------------------------------------------------------------------------------------------

BAD_ROWS = [
    ("multiple_choice", '{"query": "a", "choices": ["x"], "gold": 0', "bad JSON"),
    ("multiple_choice", '["a", "b"]', "JSON object"),
    ("multiple_choice", {"choices": ["x"], "gold": 0}, "missing field `query`"),
    ("multiple_choice", {"query": "a", "choices": [], "gold": 0}, "`choices` is empty"),
    ("multiple_choice", {"query": "a", "choices": ["x", "y"], "gold": 2}, "out of range"),
    ("multiple_choice", {"query": "a", "choices": ["x", "y"], "gold": -1}, "out of range"),
    ("multiple_choice", {"query": "a", "choices": ["x", "y"], "gold": True}, "`gold` must be int"),
    ("multiple_choice", {"query": "a", "choices": ["x", ""], "gold": 0}, "choices[1]"),
    ("multiple_choice", {"query": "a", "choices": "xy", "gold": 0}, "`choices` must be list"),
    ("multiple_choice", {"id": 1.5, "query": "a", "choices": ["x"], "gold": 0}, "`id`"),
    ("generate", {"prompt": "", "target": "x"}, "`prompt` is empty"),
    ("generate", {"prompt": "p", "target": "x", "stop": "\n"}, "`stop`"),
    ("generate", {"prompt": "p"}, "missing field `target`"),
    ("perplexity", {"text": ""}, "`text` is empty"),
    ("perplexity", {"txt": "abc"}, "missing field `text`"),
]


@pytest.mark.parametrize("kind, bad, message", BAD_ROWS)
def test_bad_row_reports_file_and_line(tmp_path, kind, bad, message):
    good = {"multiple_choice": {"query": "q", "choices": ["a", "b"], "gold": 1},
            "generate": {"prompt": "p", "target": "t"}, "perplexity": {"text": "t"}}[kind]
    path = write_jsonl(tmp_path / "t.jsonl", [good, "", {**good, "id": "second"}, bad])
    with pytest.raises(EvalError) as err:
        load_items(spec(kind, path))
    assert err.value.where == f"{path}:4"
    assert message in str(err.value)


def test_duplicate_ids_and_empty_files(tmp_path):
    row = {"query": "q", "choices": ["a"], "gold": 0}
    with pytest.raises(EvalError, match=r"t.jsonl:2: duplicate item id .* \(first on line 1\)"):
        load_items(spec("multiple_choice", write_jsonl(tmp_path / "t.jsonl", [row, row])))
    with pytest.raises(EvalError, match="no items"):
        load_items(spec("multiple_choice", write_jsonl(tmp_path / "e.jsonl", ["", "  "])))
    with pytest.raises(EvalError, match="not found"):
        load_items(spec("multiple_choice", tmp_path / "missing.jsonl"))


def test_items_and_stable_ids(tmp_path):
    rows = mc_rows(5) + [{"id": "named", "query": "q ", "choices": [" a", " b"], "gold": 1}]
    items = load_items(spec("multiple_choice", write_jsonl(tmp_path / "a.jsonl", rows)))
    assert items[-1] == MultipleChoiceItem("named", "q ", (" a", " b"), 1)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    again = load_items(spec("multiple_choice", write_jsonl(tmp_path / "b.jsonl", shuffled)))
    assert {i.id: i for i in items} == {i.id: i for i in again}   # ids follow content, not line numbers
    assert len({i.id for i in items}) == 6
    extra = [{**r, "note": "metadata"} for r in rows]  # unknown row fields are ignored
    assert [i.id for i in load_items(spec("multiple_choice", write_jsonl(tmp_path / "c.jsonl", extra)))] == \
        [i.id for i in items]


# --- splits ------------------------------------------------------------------------------------------------

def test_splits_are_deterministic_disjoint_and_order_free():
    ids = [f"item{i}" for i in range(400)]
    search = select_split(ids, ids, split="search", holdout=0.3, seed=7, limit=None)
    holdout = select_split(ids, ids, split="holdout", holdout=0.3, seed=7, limit=None)
    every = select_split(ids, ids, split="all", holdout=0.3, seed=7, limit=None)
    assert not set(search) & set(holdout) and set(search) | set(holdout) == set(ids) == set(every)
    assert 0.22 < len(holdout) / len(ids) < 0.38
    reversed_ids = ids[::-1]
    assert select_split(reversed_ids, reversed_ids, split="search", holdout=0.3, seed=7, limit=None) == search
    assert select_split(ids, ids, split="search", holdout=0.3, seed=8, limit=None) != search
    assert select_split(ids, ids, split="search", holdout=0.0, seed=7, limit=None) != []
    assert select_split(ids, ids, split="holdout", holdout=0.0, seed=7, limit=None) == []


def test_limit_is_a_seeded_nested_subset_per_split():
    ids = [f"item{i}" for i in range(300)]
    small = select_split(ids, ids, split="search", holdout=0.5, seed=1, limit=10)
    large = select_split(ids, ids, split="search", holdout=0.5, seed=1, limit=40)
    assert len(small) == 10 and len(large) == 40 and set(small) <= set(large)
    assert small == select_split(ids, ids, split="search", holdout=0.5, seed=1, limit=10)
    assert small != select_split(ids, ids, split="search", holdout=0.5, seed=2, limit=10)
    holdout = select_split(ids, ids, split="holdout", holdout=0.5, seed=1, limit=10)
    both = select_split(ids, ids, split="all", holdout=0.5, seed=1, limit=10)
    assert len(holdout) == 10 and not set(small) & set(holdout) and set(both) == set(small) | set(holdout)
    # growing the file never moves an item across the split
    grown = ids + [f"new{i}" for i in range(100)]
    assert set(select_split(grown, grown, split="holdout", holdout=0.5, seed=1, limit=None)) >= \
        set(select_split(ids, ids, split="holdout", holdout=0.5, seed=1, limit=None))
    with pytest.raises(EvalError):
        select_split(ids, ids, split="train", holdout=0.5, seed=1, limit=None)
