"""Test helpers: write real study/soup YAMLs and task JSONL files for the tiny zoo into a folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml


def addition_items(n: int, seed: int = 0) -> list[dict]:
    """Multiple-choice addition items the ft_add model has seen the format of."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        wrong = sorted({a + b + d for d in (-10, -1, 1, 10)} - {a + b})[:3]
        choices = [str(a + b)] + [str(w) for w in wrong]
        rng.shuffle(choices)
        items.append({"id": f"add-{i}", "query": f"{a}+{b}=", "choices": choices, "gold": choices.index(str(a + b))})
    return items


def reverse_items(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(4))
        wrong = [word, word[1:] + word[0], word[::-1][1:] + word[-1]]
        choices = [" " + word[::-1]] + [" " + w for w in wrong if w != word[::-1]][:2]
        rng.shuffle(choices)
        items.append({"id": f"rev-{i}", "query": f"rev {word} =", "choices": choices,
                      "gold": choices.index(" " + word[::-1])})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_study(folder: Path, zoo: dict, *, name: str = "t", method: str = "ties", params: dict | None = None,
                granularity: str = "layer", per_filter: list | None = None, trials: int = 6,
                sampler: str = "random", pruner: str = "none", holdout: float = 0.5, n_items: int = 24,
                extra: dict | None = None) -> Path:
    """A study YAML over base + ft_add + ft_reverse with two multiple-choice tasks; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data" / "add.jsonl", addition_items(n_items))
    write_jsonl(folder / "data" / "rev.jsonl", reverse_items(n_items))
    if method == "slerp":
        merge = {"merge_method": "slerp", "base_model": str(zoo["base"]),
                 "models": [{"model": str(zoo["base"])}, {"model": str(zoo["ft_add"])}], "dtype": "float32"}
    elif method == "linear":
        merge = {"merge_method": "linear", "dtype": "float32",
                 "models": [{"model": str(zoo["ft_add"])}, {"model": str(zoo["ft_reverse"])}]}
    else:
        merge = {"merge_method": method, "base_model": str(zoo["base"]), "dtype": "float32",
                 "models": [{"model": str(zoo["ft_add"])}, {"model": str(zoo["ft_reverse"])}]}
    space = {"granularity": granularity, "params": params or {"weight": [0.0, 1.0], "density": [0.2, 1.0]}}
    if per_filter:
        space["per_filter"] = per_filter
    study = {
        "name": name, "output_dir": "run", "merge": merge, "space": space,
        "evaluation": {"tasks": [{"name": "add", "kind": "multiple_choice", "path": "data/add.jsonl"},
                                 {"name": "rev", "kind": "multiple_choice", "path": "data/rev.jsonl"}],
                       "holdout": holdout, "seed": 0},
        "sampler": {"name": sampler, "seed": 0}, "pruner": {"name": pruner},
        "budget": {"trials": trials},
    }
    study.update(extra or {})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path
