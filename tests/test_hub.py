"""Hugging Face Hub ids as model references: found in a local cache laid out as huggingface_hub lays it out (blobs,
refs, snapshots of symlinks), never fetched unless the user allows downloads, and then safetensors only."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from arch_zoo import build_family
from mergekit_oracle import max_abs_diff, read_folder, run_mergekit

from merge_core.config import config_to_dict, parse_config
from merge_core.errors import MergeConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Put `folder`'s files in `cache` as a Hub snapshot of `repo_id` (blobs + symlinks + refs/branch)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    family = build_family("llama", root / "models")
    cache = root / "cache"
    for name in ("base", "ft1", "ft2"):
        cache_repo(cache, f"org/tiny-{name}", family[name])
    return {"cache": cache, **family}


@pytest.fixture
def offline_cache(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.delenv("MERGESEARCH_ALLOW_DOWNLOAD", raising=False)
    return hub["cache"]


def ties(base: str, ft1: str, ft2: str) -> dict:
    return {"merge_method": "ties", "base_model": base, "dtype": "float32",
            "models": [{"model": ft1, "parameters": {"weight": [0.2, 0.8, 0.5], "density": 0.5}},
                       {"model": ft2, "parameters": {"weight": 0.6, "density": 0.5}}]}


def ours(config: dict, out: Path):
    from merge_core.writer import merge_to_folder

    merge_to_folder(parse_config(config), out, device="cpu", copy_tokenizer=False, force=True)
    return read_folder(out)


def test_hub_ids_merge_from_the_local_cache(hub, offline_cache, tmp_path):
    by_id = ties("org/tiny-base", f"org/tiny-ft1@{COMMIT[:10]}", "org/tiny-ft2@main")
    cfg = parse_config(by_id)
    assert cfg.resolve_model("org/tiny-base") == offline_cache / "models--org--tiny-base" / "snapshots" / COMMIT
    local = ties(str(hub["base"]), str(hub["ft1"]), str(hub["ft2"]))
    mine = ours(by_id, tmp_path / "by_id")
    assert max_abs_diff(mine, ours(local, tmp_path / "local"))[0] == 0.0
    assert max_abs_diff(mine, run_mergekit(local, tmp_path / "mergekit"))[0] <= 1e-5
    assert config_to_dict(cfg, absolute_paths=True)["base_model"] == "org/tiny-base"   # mergekit finds it too


def test_hf_home_layout_and_a_local_folder_wins(hub, monkeypatch, tmp_path):
    home = tmp_path / "hf_home"
    shutil.copytree(hub["cache"], home / "hub", symlinks=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert parse_config(ties("org/tiny-base", "org/tiny-ft1", "org/tiny-ft2")).resolve_model("org/tiny-ft1") == \
        home / "hub" / "models--org--tiny-ft1" / "snapshots" / COMMIT
    (tmp_path / "org" / "tiny-ft1").mkdir(parents=True)        # a folder of that name, next to the YAML
    cfg = parse_config(ties("org/tiny-base", "org/tiny-ft1", "org/tiny-ft2"), base_dir=tmp_path)
    assert cfg.resolve_model("org/tiny-ft1") == tmp_path / "org" / "tiny-ft1"


def test_absent_hub_id_is_one_line_and_nothing_is_fetched(hub, offline_cache, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("network used"))
    with pytest.raises(MergeConfigError) as err:
        ours(ties("org/tiny-base", "org/absent", "org/tiny-ft2"), tmp_path / "out")
    text = str(err.value)
    assert err.value.where == "model org/absent" and "\n" not in text
    assert "not in the Hugging Face cache" in text and "MERGESEARCH_ALLOW_DOWNLOAD=1" in text
    assert str(offline_cache) in text
    with pytest.raises(MergeConfigError, match="not in the Hugging Face cache"):
        ours(ties("org/tiny-base", "org/tiny-ft1@v2", "org/tiny-ft2"), tmp_path / "out")   # no such revision


def test_allowed_download_fetches_safetensors_only(hub, offline_cache, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None, cache_dir=None, **_):
        calls.append((repo_id, allow_patterns))
        for banned in ("pytorch_model.bin", "adapter_model.bin", "model.pt", "modeling_tiny.py"):
            assert not any(fnmatch.fnmatch(banned, p) for p in allow_patterns), banned
        return str(cache_repo(Path(cache_dir), repo_id, hub["ft1"], commit="f" * 40))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("MERGESEARCH_ALLOW_DOWNLOAD", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    mine = ours(ties("org/tiny-base", "org/fresh", "org/tiny-ft2"), tmp_path / "out")
    assert [c[0] for c in calls] == ["org/fresh"] and "*.safetensors" in calls[0][1]
    assert max_abs_diff(mine, ours(ties("org/tiny-base", "org/tiny-ft1", "org/tiny-ft2"), tmp_path / "b"))[0] == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")               # the Hub's own offline switch wins
    with pytest.raises(MergeConfigError, match="HF_HUB_OFFLINE=1 is set"):
        ours(ties("org/tiny-base", "org/other", "org/tiny-ft2"), tmp_path / "c")


def test_adapter_from_the_hub_cache(hub, offline_cache, tmp_path):
    from test_lora import make_adapter

    adapter = make_adapter(hub["base"], tmp_path / "adapter", 3, r=2, lora_alpha=4, target_modules=["q_proj"])
    cache_repo(offline_cache, "org/tiny-lora", adapter)
    by_id = {"merge_method": "task_arithmetic", "base_model": "org/tiny-base", "dtype": "float32",
             "models": [{"model": "org/tiny-base+org/tiny-lora", "parameters": {"weight": 0.5}}]}
    local = {**by_id, "base_model": str(hub["base"]),
             "models": [{"model": f"{hub['base']}+{adapter}", "parameters": {"weight": 0.5}}]}
    assert max_abs_diff(ours(by_id, tmp_path / "a"), ours(local, tmp_path / "b"))[0] == 0.0
