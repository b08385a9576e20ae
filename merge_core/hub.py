"""Hugging Face Hub ids (`org/name`, `org/name@revision`) as model references: found in the local Hub cache
(HF_HUB_CACHE, else HF_HOME/hub) with no network; downloaded (safetensors weights only) only when the user allows it.

Owns the one place mergesearch may touch the network, behind MERGESEARCH_ALLOW_DOWNLOAD=1. Never runs code from a
repository and never fetches pickle weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from merge_core.errors import MergeConfigError

ALLOW_ENV = "MERGESEARCH_ALLOW_DOWNLOAD"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a download fetches: safetensors weights, configs and tokenizer files. Never *.bin / *.pt / *.py.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
                     "*.jinja"]


def is_hub_id(text: str) -> bool:
    """Whether `text` (without a revision) has the shape of a Hub repository id, `org/name`."""
    return bool(HUB_ID.match(text)) and ".." not in text


def hub_cache() -> Path:
    """The Hub cache folder, as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def downloads_allowed() -> bool:
    """True when the user allows downloads (MERGESEARCH_ALLOW_DOWNLOAD=1) and has not set HF_HUB_OFFLINE=1."""
    allowed = os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return allowed and not offline


def _complete(folder: Path, kind: str) -> bool:
    """Whether a snapshot holds what a model (config + safetensors) or an adapter (adapter config + weights) needs."""
    if kind == "adapter":
        return (folder / "adapter_config.json").is_file() and any(folder.glob("adapter_model.*"))
    return (folder / "config.json").is_file() and (any(folder.glob("*.safetensors"))
                                                   or any(folder.glob("pytorch_model*.bin")))


def cached_snapshot(repo_id: str, revision: str | None = None, kind: str = "model") -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (a branch, tag or commit; default main), or None."""
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    rev = revision or "main"
    candidates = []
    ref_file = repo / "refs" / rev
    if ref_file.is_file():
        candidates.append(snapshots / ref_file.read_text().strip())
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        candidates.append(snapshots / rev)
    elif len(rev) >= 7 and re.fullmatch(r"[0-9a-f]+", rev):   # an abbreviated commit
        candidates += sorted(p for p in snapshots.iterdir() if p.name.startswith(rev))
    return next((c for c in candidates if c.is_dir() and _complete(c, kind)), None)


def find_hub(repo_id: str, revision: str | None, kind: str, where: str) -> Path | None:
    """The local folder of a Hub repository: from the cache, else downloaded when allowed; None when it is not
    cached and downloads are off (see `not_found_hint` for the line to show)."""
    found = cached_snapshot(repo_id, revision, kind)
    if found is not None or not downloads_allowed():
        return found
    return _download(repo_id, revision, kind, where)


def not_found_hint(name: str) -> str:
    """What to add to a 'not found' error for a reference shaped like a Hub id (empty for other paths)."""
    if not is_hub_id(name):
        return ""
    if downloads_allowed():
        return ""
    why = ("HF_HUB_OFFLINE=1 is set" if os.environ.get(ALLOW_ENV)
           else f"downloads are off: set {ALLOW_ENV}=1 to fetch its safetensors")
    return f"; as a Hub id, {name} is not in the Hugging Face cache at {hub_cache()} either ({why})"


def _download(repo_id: str, revision: str | None, kind: str, where: str) -> Path:
    try:
        from huggingface_hub import snapshot_download   # only when a download is allowed and needed

        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS,
                                        cache_dir=str(hub_cache())))
    except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors alike: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergeConfigError(f"download of {repo_id} failed: {first}", where) from None
    if kind == "model" and not any(folder.glob("*.safetensors")):
        raise MergeConfigError(f"{repo_id} has no safetensors weights (mergesearch downloads no pickle .bin files)",
                               where)
    if kind == "adapter" and not (folder / "adapter_model.safetensors").is_file():
        raise MergeConfigError(f"{repo_id} has no adapter_model.safetensors (mergesearch downloads no pickle .bin "
                               "files)", where)
    return folder
