"""A task may bring its own held-out file: its items are the holdout split, the task file's the search split."""

import pytest
from studyfiles import addition_items, write_jsonl

from evaluators import EvalError
from evaluators.suite import Suite
from evaluators.tasks import parse_evaluation_block


def test_holdout_file_defines_the_holdout_split(zoo, tmp_path):
    from transformers import AutoTokenizer

    rows = addition_items(30)
    write_jsonl(tmp_path / "s.jsonl", rows[:20])
    write_jsonl(tmp_path / "h.jsonl", rows[20:])
    cfg = parse_evaluation_block({"tasks": [{"name": "add", "kind": "multiple_choice", "path": "s.jsonl",
                                             "holdout_path": "h.jsonl", "limit": 8}]}, tmp_path)
    assert cfg.has_holdout
    suite = Suite.from_config(cfg, AutoTokenizer.from_pretrained(zoo["base"]))
    search = {item for _, _, item in suite.steps("search")}
    holdout = {item for _, _, item in suite.steps("holdout")}
    assert len(search) == 8 and len(holdout) == 8
    assert search <= {r["id"] for r in rows[:20]} and holdout <= {r["id"] for r in rows[20:]}
    assert suite.size("all") == 16


def test_an_item_in_both_files_is_refused(zoo, tmp_path):
    from transformers import AutoTokenizer

    rows = addition_items(10)
    write_jsonl(tmp_path / "s.jsonl", rows)
    write_jsonl(tmp_path / "h.jsonl", rows[5:])
    cfg = parse_evaluation_block({"tasks": [{"kind": "multiple_choice", "path": "s.jsonl",
                                             "holdout_path": "h.jsonl"}]}, tmp_path)
    with pytest.raises(EvalError, match="both the task file and its holdout file"):
        Suite.from_config(cfg, AutoTokenizer.from_pretrained(zoo["base"]))


def test_skip_uninformative_is_a_boolean(tmp_path):
    tasks = [{"name": "add", "kind": "multiple_choice", "path": "s.jsonl"}]
    assert not parse_evaluation_block({"tasks": tasks}, tmp_path).skip_uninformative
    assert parse_evaluation_block({"tasks": tasks, "skip_uninformative": True}, tmp_path).skip_uninformative
    with pytest.raises(EvalError, match="skip_uninformative.*true or false"):
        parse_evaluation_block({"tasks": tasks, "skip_uninformative": "yes"}, tmp_path)
