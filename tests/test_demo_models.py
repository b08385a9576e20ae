"""The demo family builder: deterministic, loadable, valid tasks, a manifest cache, atomic builds."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

import demo_family as dm


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "family"
    manifest = dm.build_demo_family(out, quick=True)
    assert manifest["cached"] is False
    return out


def _bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != dm.MANIFEST}


def test_quick_build_is_deterministic(quick, tmp_path):
    again = dm.build_demo_family(tmp_path / "again", quick=True)
    first = dm.read_manifest(quick)
    assert again["content_hash"] == first["content_hash"] == dm.content_hash(quick)
    assert _bytes(tmp_path / "again") == _bytes(quick)
    assert again["final_train_loss"] == first["final_train_loss"]


def test_layout_and_manifest(quick):
    m = dm.read_manifest(quick)
    assert m["kind"] == dm.KIND and m["quick"] is True and m["plan_hash"] == dm.QUICK_PLAN.plan_hash()
    for folder in ["base", *m["models"]["specialists"].values(), *m["models"]["soup"]]:
        assert (quick / folder / "model.safetensors").is_file(), folder
        assert (quick / folder / "config.json").is_file() and (quick / folder / "tokenizer.json").is_file()
    assert len(m["models"]["soup"]) >= 3 and all(p.startswith("soup/checkpoint-") for p in m["models"]["soup"])
    assert set(m["final_train_loss"]) == {"base", *(f"spec_{s}" for s in dm.SPECIALIST_SKILLS), *m["models"]["soup"]}
    assert all(loss == loss and loss > 0 for loss in m["final_train_loss"].values())   # finite, positive
    assert {"torch", "transformers", "python"} <= set(m["versions"])
    assert sorted(m["files"]) == sorted(_bytes(quick))


def test_models_load_with_auto_classes(quick):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = dm.read_manifest(quick)
    tok = AutoTokenizer.from_pretrained(quick / "base")
    assert tok.decode(tok.encode("R abcde = edcba", add_special_tokens=False)) == "R abcde = edcba"
    base = AutoModelForCausalLM.from_pretrained(quick / "base")
    for folder in [*m["models"]["specialists"].values(), *m["models"]["soup"]]:
        model = AutoModelForCausalLM.from_pretrained(quick / folder)
        assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
        ids = torch.tensor([tok.encode("S abcde =", add_special_tokens=False)])
        assert torch.isfinite(model(input_ids=ids).logits).all()
        # a real fine-tune of the base: every layer moved, shapes equal
        changed = [n for (n, p), q in zip(model.named_parameters(), base.parameters())
                   if p.shape == q.shape and not torch.equal(p, q)]
        assert len(changed) > 0.5 * len(list(base.parameters())), folder


def test_jsonl_rows_are_valid(quick):
    m = dm.read_manifest(quick)
    assert set(m["tasks"]) == {*dm.SPECIALIST_SKILLS, dm.SOUP_TASK}
    for task, info in m["tasks"].items():
        op = info["operation"]
        ids = set()
        for split in ("search", "holdout"):
            rows = dm.read_jsonl(quick / info[split])
            assert len(rows) == dm.QUICK_PLAN.n_search
            for row in rows:
                assert set(row) == {"id", "query", "choices", "gold"}
                assert row["query"].startswith(info["cue"] + " ") and row["query"].endswith("=")
                assert len(row["choices"]) == info["choices"] and len(set(row["choices"])) == info["choices"]
                assert info["choices"] == (4 if info["role"] == "specialist" else dm.QUICK_PLAN.soup_choices)
                assert all(c.startswith(" ") and len(c) == len(row["choices"][0]) for c in row["choices"])
                word = row["query"].split()[1]
                assert row["choices"][row["gold"]] == " " + dm.answer(op, word)
                assert " " + word in row["choices"]                      # the copy is always a distractor
                if info["role"] == "specialist":                         # and so are the other skills' answers
                    assert {" " + dm.answer(o, word) for o in dm.SPECIALIST_SKILLS} <= set(row["choices"])
                ids.add(row["id"])
            for row in dm.read_jsonl(quick / info[f"gen_{split}"]) if f"gen_{split}" in info else []:
                assert set(row) == {"id", "prompt", "target", "stop"} and row["stop"] == ["\n"]
                assert row["target"] == " " + dm.answer(op, row["prompt"].split()[1])
                ids.add(row["id"])
        n_gen = dm.QUICK_PLAN.n_generate if "gen_search" in info else 0
        assert len(ids) == 2 * (dm.QUICK_PLAN.n_search + n_gen), task


def test_search_and_holdout_are_disjoint_and_unseen_in_training(quick):
    m = dm.read_manifest(quick)
    reserved = dm._reserved_words(dm.QUICK_PLAN)
    for info in m["tasks"].values():
        search = {r["query"].split()[1] for r in dm.read_jsonl(quick / info["search"])}
        holdout = {r["query"].split()[1] for r in dm.read_jsonl(quick / info["holdout"])}
        assert search and holdout and not search & holdout
        assert search | holdout <= reserved
    sampler = dm._Sampler(dm.SPECIALIST_SKILLS, reserved, replay=0.3)
    rng = random.Random(0)
    for _ in range(2000):
        line = sampler(rng)
        if " = " in line:                                    # "<cue> <word> = <answer>": the input is unseen
            assert line.split()[1] not in reserved, line


def test_the_full_plan_keeps_splits_disjoint():
    words = dm._eval_words(dm.FULL_PLAN)
    every = [w for splits in words.values() for ws in splits.values() for w in ws]
    assert len(every) == len(set(every))                       # no word in two splits or two tasks
    for splits in words.values():
        assert len(splits["search"]) == dm.FULL_PLAN.n_search and len(splits["holdout"]) == dm.FULL_PLAN.n_holdout


def test_cache_hit_skips_the_build(quick, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("rebuilt despite a matching manifest")

    monkeypatch.setattr(dm, "_build_into", boom)
    again = dm.build_demo_family(quick, quick=True)
    assert again["cached"] is True and again["content_hash"] == dm.read_manifest(quick)["content_hash"]
    assert dm.is_complete(quick, quick=True)
    assert not dm.is_complete(quick, quick=False)          # another plan: not this build


def test_interrupted_build_is_not_complete(tmp_path, monkeypatch):
    out = tmp_path / "family"
    import tiny_models as toy

    calls = {"n": 0}
    original = toy.save_model

    def dying_save(model, tok, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(model, tok, path)

    monkeypatch.setattr(toy, "save_model", dying_save)
    for key, value in dm.pinned_kernels().items():      # build in this process (where save_model is patched)
        monkeypatch.setenv(key, value)
    with pytest.raises(KeyboardInterrupt):
        dm.build_demo_family(out, quick=True)
    assert not out.exists() and not dm.is_complete(out, quick=True)
    assert not list(tmp_path.glob(".family.*"))           # the temp folder went with the failure


def test_killed_build_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "family"
    # what a SIGKILL leaves behind: a temp folder of a dead process, with models but no manifest
    stale = tmp_path / ".family.999999999.deadbeef.tmp"
    (stale / "base").mkdir(parents=True)
    (stale / "base" / "model.safetensors").write_bytes(b"partial")
    assert not dm.is_complete(out, quick=True)
    dm.build_demo_family(out, quick=True)
    assert dm.is_complete(out, quick=True) and not stale.exists()


def test_damaged_build_is_rebuilt(tmp_path):
    out = tmp_path / "family"
    first = dm.build_demo_family(out, quick=True)
    (out / "spec_rev" / "model.safetensors").unlink()
    assert not dm.is_complete(out, quick=True)
    again = dm.build_demo_family(out, quick=True)
    assert again["cached"] is False and again["content_hash"] == first["content_hash"]
    manifest = json.loads((out / dm.MANIFEST).read_text())
    manifest["plan_hash"] = "something-else"
    (out / dm.MANIFEST).write_text(json.dumps(manifest))
    assert dm.build_demo_family(out, quick=True)["cached"] is False


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo build"):
        dm.build_demo_family(out, quick=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_builds_pin_the_cpu_kernels(quick, tmp_path):
    """The bytes do not depend on the CPU's vector units: a build under other ATen kernels is the same build."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_models.py"
    other = tmp_path / "other"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2" if os.environ.get("ATEN_CPU_CAPABILITY") != "avx2" else "default"}
    res = subprocess.run([sys.executable, str(script), "--out", str(other), "--quick"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert dm.read_manifest(other)["content_hash"] == dm.read_manifest(quick)["content_hash"]
    assert dm.read_manifest(quick)["kernels"] == dm.pinned_kernels()


def test_cli_wrapper(quick, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_models.py"
    res = subprocess.run([sys.executable, str(script), "--out", str(quick), "--quick"], capture_output=True,
                         text=True, timeout=300, env={**os.environ})
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["cached"] is True and summary["content_hash"] == dm.read_manifest(quick)["content_hash"]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "x"), "--quick"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "not a demo build" in res.stderr
