"""Study YAML -> StudyConfig: the merge skeleton, search space, evaluation, sampler, pruner, budget.

Owns parsing and validation of study files (every problem is a StudyError naming file and field);
builds nothing and runs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.tasks import parse_evaluation_block
from merge_core import MergeConfigError
from merge_core.config import parse_config, read_yaml_mapping, resolve_path
from search import StudyError, store
from search.compare import AGGREGATES

DEFAULT_AGGREGATE = "worst"          # chosen by measurement: README, "Choosing the objective"
DEFAULT_EVERY = 16                   # items per task between pruner reports
SAMPLERS = tuple(store.SAMPLERS)
PRUNERS = tuple(store.PRUNERS)
FILTER_GROUPS_DEFAULT = ("self_attn", "mlp")
TOP_LEVEL_KEYS = {"name", "output_dir", "merge", "space", "evaluation", "sampler", "pruner", "budget",
                  "objective", "seed_trials", "final", "device", "storage", "seed", "soup_config"}


def parse_duration(text: Any, where: str) -> float | None:
    """'8h', '30m', '90s', '1h30m', or a number of seconds -> seconds (None stays None)."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                             str(text))
        if not parts or not any(parts.groups()):
            raise StudyError(f"bad duration {text!r} (e.g. 90s, 30m, 8h, 1h30m)", where)
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise StudyError(f"duration must be positive, got {text!r}", where)
    return seconds


@dataclass(frozen=True)
class SpaceConfig:
    """What the search varies: which parameters, within which bounds, at which granularity."""

    params: dict[str, tuple[float, float]]
    granularity: str = "layer"          # global | layer | anchors
    anchors: int | None = None          # K for anchors:K
    per_filter: tuple[str, ...] = ()    # separate values per filter group (+ one for the rest)
    per_model: bool = True              # model-level parameters get one value per source model


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "tpe"
    seed: int = 0
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PrunerConfig:
    name: str = "none"
    options: dict = field(default_factory=dict)
    every: int | None = None     # items per task between two pruner reports (None: no pruning, one chunk per task)


@dataclass
class StudyConfig:
    """A validated study file. Paths are absolute (relative ones resolve against the YAML's folder)."""

    name: str
    path: Path
    output_dir: Path
    merge: Any                       # merge_core.config.MergeConfig (the skeleton the genome fills)
    merge_raw: dict
    space: SpaceConfig
    evaluation: Any                  # evaluators.tasks.EvaluationSpec
    sampler: SamplerConfig
    pruner: PrunerConfig
    trials: int | None
    timeout: float | None
    multi_objective: bool = False
    aggregate: str = DEFAULT_AGGREGATE   # how task scores make the objective: mean | normalized | worst
    baselines: bool = True               # score the plain merges at the end (final.baselines)
    seed_trials: tuple[str, ...] = ("parents", "uniform", "defaults")
    top_k: int = 5
    device: str = "auto"
    storage: str | None = None
    seed: int = 0
    soup_config: Path | None = None  # a soup_config.yaml whose ingredients seed a trial
    allow_pickle: bool = False       # --allow-pickle (a command-line choice, never read from the YAML)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def storage_url(self, override: str | None = None) -> str:
        """The Optuna storage: --storage, else the YAML's `storage`, else sqlite in output_dir."""
        url = override or self.storage
        if url:
            return url
        return f"sqlite:///{self.output_dir / 'study.db'}"


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"must be a mapping, got {type(value).__name__}", where)
    return value


def _reject_unknown(data: dict, allowed: set[str], where: str) -> None:
    """`where` names the mapping: 'file.yaml: budget' (its keys are budget.KEY) or 'file.yaml:' (top level)."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        key = unknown[0]
        raise StudyError(f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
                         f"{where} {key}" if where.endswith(":") else f"{where}.{key}" if where else key)


def integer(value: Any, where: str, minimum: int | None = None) -> int:
    """A YAML integer (not a bool, not a string), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StudyError(f"must be an integer, got {value!r}", where)
    if minimum is not None and value < minimum:
        raise StudyError(f"must be an integer >= {minimum}, got {value}", where)
    return value


def boolean(value: Any, where: str) -> bool:
    """A YAML boolean (true/false): a quoted "no" or a 0 is refused, not taken as its truthiness."""
    if not isinstance(value, bool):
        raise StudyError(f"must be true or false, got {value!r}", where)
    return value


def _bounds(value: Any, where: str) -> tuple[float, float]:
    if isinstance(value, dict):
        _reject_unknown(value, {"low", "high"}, where)
        value = [value.get("low"), value.get("high")]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise StudyError("bounds must be [low, high] numbers", where)
    low, high = float(value[0]), float(value[1])
    if not low < high:
        raise StudyError(f"low must be below high, got [{low}, {high}]", where)
    return low, high


def parse_space(data: Any, where: str) -> SpaceConfig:
    data = _mapping(data, where)
    _reject_unknown(data, {"granularity", "per_filter", "params", "per_model"}, where)
    params = _mapping(data.get("params"), f"{where}.params")
    if not params:
        raise StudyError("no parameters to search (e.g. params: {weight: [0, 1], density: [0.1, 1]})",
                         f"{where}.params")
    bounds = {name: _bounds(v, f"{where}.params.{name}") for name, v in params.items()}
    gran = str(data.get("granularity", "layer"))
    anchors = None
    if m := re.fullmatch(r"anchors:(\d+)", gran):
        anchors = int(m.group(1))
        if anchors < 2:
            raise StudyError("anchors:K needs K >= 2 (use global for one value)", f"{where}.granularity")
        gran = "anchors"
    elif gran not in ("global", "layer"):
        raise StudyError(f"unknown granularity {gran!r} (global | layer | anchors:K)", f"{where}.granularity")
    per_filter = data.get("per_filter") or ()
    if per_filter is True:
        per_filter = FILTER_GROUPS_DEFAULT
    if not isinstance(per_filter, (list, tuple)) or not all(isinstance(f, str) and f for f in per_filter):
        raise StudyError("per_filter must be a list of tensor-name filters, e.g. [self_attn, mlp]",
                         f"{where}.per_filter")
    return SpaceConfig(params=bounds, granularity=gran, anchors=anchors, per_filter=tuple(per_filter),
                       per_model=boolean(data.get("per_model", True), f"{where}.per_model"))


def parse_named(data: Any, where: str, allowed: tuple[str, ...], default: str, file: str = "") -> tuple[str, dict]:
    """`{name: x, ...options}` or a bare name -> (name, options). `file` prefixes locations ('x.yaml: ')."""
    if data is None:
        return default, {}
    if isinstance(data, str):
        data = {"name": data}
    data = dict(_mapping(data, f"{file}{where}"))
    name = str(data.pop("name", default))
    if name not in allowed:
        raise StudyError(f"unknown {where} {name!r} (one of: {', '.join(allowed)})", f"{file}{where}.name")
    return name, data


def parse_study(data: Any, path: Path) -> StudyConfig:
    """Validate a loaded study YAML (a dict) that came from `path`."""
    where = path.name
    data = _mapping(data, where)
    _reject_unknown(data, TOP_LEVEL_KEYS, f"{where}:")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise StudyError("needs a name made of letters, digits, '.', '_' or '-'", f"{where}: name")
    base_dir = path.parent.absolute()
    output_dir = resolve_path(data.get("output_dir", f"runs/{name}"), base_dir)
    merge_raw = _mapping(data.get("merge"), f"{where}: merge")
    if not merge_raw:
        raise StudyError("missing the merge block (a mergekit config the search fills in)", f"{where}: merge")
    try:
        merge = parse_config(merge_raw, where=f"{where}: merge", base_dir=base_dir)
    except MergeConfigError as err:
        raise StudyError(str(err)) from None
    if "evaluation" not in data:
        raise StudyError("missing the evaluation block (tasks to score candidates on)", f"{where}: evaluation")
    evaluation = parse_evaluation_block(_mapping(data["evaluation"], f"{where}: evaluation"), base_dir,
                                        where=f"{where}: evaluation")
    seed = integer(data.get("seed", 0), f"{where}: seed")
    s_name, s_opts = parse_named(data.get("sampler"), "sampler", SAMPLERS, "tpe", f"{where}: ")
    s_seed = integer(s_opts.pop("seed", seed), f"{where}: sampler.seed")
    p_name, p_opts = parse_named(data.get("pruner"), "pruner", PRUNERS, "none", f"{where}: ")
    every = integer(p_opts.pop("every", DEFAULT_EVERY), f"{where}: pruner.every", 1) if p_name != "none" else None
    # Built once here, thrown away: a typo in an option or a bad value is found before anything is created.
    store.make_sampler(s_name, s_seed, s_opts, f"{where}: sampler")
    store.make_pruner(p_name, p_opts, f"{where}: pruner")
    budget = _mapping(data.get("budget"), f"{where}: budget")
    _reject_unknown(budget, {"trials", "timeout"}, f"{where}: budget")
    trials = budget.get("trials")
    if trials is not None and (not isinstance(trials, int) or isinstance(trials, bool) or trials < 1):
        raise StudyError("trials must be a positive integer", f"{where}: budget.trials")
    objective = _mapping(data.get("objective"), f"{where}: objective")
    _reject_unknown(objective, {"multi", "aggregate"}, f"{where}: objective")
    multi = boolean(objective.get("multi", s_name == "nsga2"), f"{where}: objective.multi")
    how = objective.get("aggregate", DEFAULT_AGGREGATE)
    if how not in AGGREGATES:
        raise StudyError(f"unknown aggregate {how!r} (one of: {', '.join(AGGREGATES)})", f"{where}: objective.aggregate")
    if multi and p_name != "none":
        raise StudyError("pruning is not available for multi-objective studies (set pruner: none)",
                         f"{where}: pruner")
    seeds = data.get("seed_trials", ["parents", "uniform", "defaults"])
    if seeds in (None, False):
        seeds = []
    allowed_seeds = {"parents", "uniform", "defaults", "soup"}
    if not isinstance(seeds, list) or not set(seeds) <= allowed_seeds:
        raise StudyError(f"seed_trials must be a list drawn from {sorted(allowed_seeds)}", f"{where}: seed_trials")
    soup_config = data.get("soup_config")
    if "soup" in seeds and not soup_config:
        raise StudyError("seed trial 'soup' needs soup_config: path/to/soup_config.yaml", f"{where}: seed_trials")
    soup_path = resolve_path(soup_config, base_dir) if soup_config else None
    if soup_path and not soup_path.is_file():
        raise StudyError(f"file not found: {soup_config}", f"{where}: soup_config")
    final = _mapping(data.get("final"), f"{where}: final")
    _reject_unknown(final, {"top_k", "baselines"}, f"{where}: final")
    top_k = final.get("top_k", 5)
    if not isinstance(top_k, bool) and isinstance(top_k, int) and top_k < 1:
        raise StudyError(f"must be at least 1, got {top_k} (to skip the held-out check, set evaluation.holdout: 0)",
                         f"{where}: final.top_k")
    top_k = integer(top_k, f"{where}: final.top_k", 1)
    device = data.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise StudyError(f"must be auto, cpu, cuda or cuda:N, got {device!r}", f"{where}: device")
    storage = data.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage):
        raise StudyError(f"must be a storage URL, got {storage!r}", f"{where}: storage")
    return StudyConfig(
        name=name, path=path.absolute(), output_dir=output_dir, merge=merge, merge_raw=merge_raw,
        space=parse_space(data.get("space"), f"{where}: space"), evaluation=evaluation,
        sampler=SamplerConfig(s_name, s_seed, s_opts), pruner=PrunerConfig(p_name, p_opts, every),
        aggregate=how, baselines=boolean(final.get("baselines", True), f"{where}: final.baselines"),
        trials=trials, timeout=parse_duration(budget.get("timeout"), f"{where}: budget.timeout"),
        multi_objective=multi, seed_trials=tuple(seeds), top_k=top_k, device=device, storage=storage, seed=seed,
        soup_config=soup_path)


def load_yaml(path: Path | str, kind: str = "study") -> dict:
    """Read a study (or soup) YAML mapping; any problem is a StudyError naming the file (and line)."""
    return read_yaml_mapping(path, kind, StudyError)


def load_study(path: Path | str, allow_pickle: bool = False) -> StudyConfig:
    """Load and validate a study YAML (`allow_pickle`: the --allow-pickle choice of the command)."""
    path = Path(path)
    study = parse_study(load_yaml(path), path)
    study.allow_pickle = allow_pickle
    return study
