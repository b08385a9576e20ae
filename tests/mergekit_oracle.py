"""Run mergekit 0.1.5 (the test oracle) in-process and run our reference loop on the same config.

Test helpers only: both sides read the same model folders and return {tensor name: tensor}.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (sharded or not)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


@lru_cache(maxsize=None)
def _cached_folder(folder: str) -> dict[str, torch.Tensor]:
    return read_folder(Path(folder))


def _num_layers(folder: Path) -> int:
    return json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]


def run_mergekit(config: dict, out_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """mergekit's merge of `config` (a plain dict with absolute model paths), as tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(random_seed=seed, quiet=True, copy_tokenizer=False, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(config), str(out_dir), options=options)
    return read_folder(out_dir)


def run_ours(config: dict, seed: int | None = 0) -> dict[str, torch.Tensor]:
    """merge_core's reference loop (parse_config + merge_state_dict) on the same config."""
    from merge_core.config import parse_config
    from merge_core.plan import merge_state_dict

    cfg = parse_config(config)
    refs = cfg.referenced_models()
    folders = {ref: str(cfg.resolve_model(ref)) for ref in refs}
    names = {ref: list(_cached_folder(folders[ref])) for ref in refs}
    layers = {ref: _num_layers(Path(folders[ref])) for ref in refs}
    return merge_state_dict(cfg, lambda ref, name: _cached_folder(folders[ref])[name], names, layers, seed=seed)


def max_abs_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest |ours - theirs| over all tensors and the tensor where it occurs (names must match)."""
    worst, where = 0.0, ""
    for name, ref in theirs.items():
        diff = float((ours[name].double() - ref.double()).abs().max()) if ref.numel() else 0.0
        if diff > worst or diff != diff:
            worst, where = diff, name
    return worst, where
