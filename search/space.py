"""The search space: genes (named floats with bounds) <-> a mergekit config with gradient lists.

Owns gene naming, bounds, seed genomes (parents, uniform, defaults) and the genome -> config mapping.
Knows nothing of Optuna beyond plain dicts of gene values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge_core.architectures import find_architecture
from merge_core.config import FilteredValue, MergeConfig, Setting, load_config, parse_config
from merge_core.methods import get_method
from search import StudyError
from search.study import StudyConfig

REST = "rest"   # the filter group of tensors matched by no per_filter entry


@dataclass(frozen=True)
class Gene:
    name: str
    param: str
    low: float
    high: float
    model: int | None      # index into merge.models for model-level parameters
    group: str | None      # filter group (None when per_filter is off)
    anchor: int            # position in the gradient list


def _short(ref: str) -> str:
    """A model reference as people say it: its folder name."""
    return Path(ref).name or ref


class SearchSpace:
    """Genes of a study and the mapping genome -> MergeConfig (the study's merge with the searched values)."""

    def __init__(self, study: StudyConfig):
        self.study = study
        raw = study.merge_raw
        if raw.get("slices"):
            raise StudyError("searching slice (passthrough) configs is not supported; use models:",
                             f"{study.path.name}: merge.slices")
        self.method = get_method(study.merge.merge_method)
        self.model_refs = [entry["model"] if isinstance(entry, dict) else entry for entry in raw.get("models", [])]
        self.base_ref = raw.get("base_model")
        self.num_layers = self._num_layers()
        space = study.space
        self.anchors = {"global": 1, "layer": self.num_layers, "anchors": space.anchors}[space.granularity]
        if self.anchors > self.num_layers:
            raise StudyError(f"anchors:{self.anchors} asks for more anchors than the model has layers "
                             f"({self.num_layers}); use at most anchors:{self.num_layers} or granularity: layer",
                             f"{study.path.name}: space.granularity")
        self.groups: list[str | None] = [*space.per_filter, REST] if space.per_filter else [None]
        # a method that needs a base merges the others into it (or, SLERP, moves away from it): not searched
        self.searched_models = [i for i, ref in enumerate(self.model_refs)
                                if not (self.method.requires_base and ref == self.base_ref)]
        self.genes = self._genes()

    # ---- structure ------------------------------------------------------------------------------
    def _num_layers(self) -> int:
        ref = self.base_ref or (self.model_refs[0] if self.model_refs else None)
        if ref is None:
            raise StudyError("the merge block lists no models", f"{self.study.path.name}: merge.models")
        path = self.study.merge.resolve_model(ref)
        try:
            config = json.loads((Path(path) / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StudyError(f"cannot read config.json of model {ref}: {err}",
                             f"{self.study.path.name}: merge") from None
        arch = find_architecture(config)       # the layer count under the architecture's key (n_layer: GPT-2)
        return arch.num_layers(config) if arch is not None else int(config.get("num_hidden_layers", 1))

    def _genes(self) -> list[Gene]:
        where = f"{self.study.path.name}: space.params"
        genes: list[Gene] = []
        for param, (low, high) in self.study.space.params.items():
            spec = self.method.model_params.get(param) or self.method.params.get(param)
            if spec is None:
                known = sorted({*self.method.model_params, *self.method.params})
                raise StudyError(f"{self.method.name} has no parameter {param!r} (has: {', '.join(known)})",
                                 f"{where}.{param}")
            if spec.kind not in (float, int):
                raise StudyError(f"{param} is not numeric and cannot be searched", f"{where}.{param}")
            if (spec.low is not None and low < spec.low) or (spec.high is not None and high > spec.high):
                raise StudyError(f"bounds [{low}, {high}] leave the allowed range [{spec.low}, {spec.high}]",
                                 f"{where}.{param}")
            per_model = param in self.method.model_params and self.study.space.per_model
            models = self.searched_models if per_model else [None]
            for m in models:
                for group in self.groups:
                    for k in range(self.anchors):
                        parts = [param] + ([f"m{m}"] if m is not None else []) + ([group] if group else [])
                        if self.anchors > 1:
                            parts.append(str(k))
                        genes.append(Gene(".".join(parts), param, low, high, m, group, k))
        return genes

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    def signature(self) -> dict:
        """What must match for a stored study to be resumed with this space."""
        return {"method": self.method.name, "models": self.model_refs, "base_model": self.base_ref,
                "genes": [[g.name, g.low, g.high] for g in self.genes]}

    # ---- genome -> config -----------------------------------------------------------------------
    def config(self, genome: dict[str, float]) -> MergeConfig:
        """The merge a genome describes: the study's merge (its skeleton, parsed once) with the searched values
        filled in, as typed settings (a scalar, a gradient list, or a filter list per group)."""
        missing = [n for n in self.names if n not in genome]
        if missing:
            raise StudyError(f"genome lacks gene {missing[0]!r}", "genome")
        skeleton = self.study.merge
        top = dict(skeleton.parameters)
        per_model = [dict(m.parameters) for m in skeleton.models]
        for param in self.study.space.params:
            genes = [g for g in self.genes if g.param == param]
            for m in {g.model for g in genes}:
                (top if m is None else per_model[m])[param] = self._setting(genes, m, genome)
        return skeleton.with_parameters(top, per_model)

    def _setting(self, genes: list[Gene], model: int | None, genome: dict[str, float]) -> Setting:
        spec = self.method.model_params.get(genes[0].param) or self.method.params[genes[0].param]

        def values(group):
            row = [spec.kind(genome[g.name]) if spec.kind is float else round(genome[g.name])
                   for g in sorted(genes, key=lambda g: g.anchor) if g.model == model and g.group == group]
            return row[0] if len(row) == 1 else tuple(row)

        if self.groups == [None]:
            return values(None)
        return tuple(FilteredValue(values(group), None if group == REST else group) for group in self.groups)

    # ---- seed genomes ---------------------------------------------------------------------------
    def clip(self, genome: dict[str, float]) -> dict[str, float]:
        return {g.name: min(max(float(genome[g.name]), g.low), g.high) for g in self.genes}

    def constant(self, values: dict[str, float], per_model: dict[int, dict[str, float]] | None = None
                 ) -> dict[str, float]:
        """A genome with the same value at every layer/group: values[param], overridden per model."""
        genome = {}
        for g in self.genes:
            v = (per_model or {}).get(g.model, {}).get(g.param, values.get(g.param))
            genome[g.name] = (g.low + g.high) / 2 if v is None else v
        return self.clip(genome)

    def default_values(self) -> dict[str, float]:
        """Each searched parameter at the method's default (mid-range when it has none)."""
        out = {}
        for param, (low, high) in self.study.space.params.items():
            spec = self.method.model_params.get(param) or self.method.params.get(param)
            out[param] = spec.default if isinstance(spec.default, (int, float)) and not isinstance(
                spec.default, bool) else (low + high) / 2
        return out

    def parent_genomes(self) -> list[tuple[str, dict[str, float]]] | None:
        """Each searched model alone, as a genome of this space (t at 0 and 1; weight 1 on it and 0 on the others,
        density 1), when the bounds allow exactly that; else None."""
        parents = [(label, genome) for label, genome in self.seed_genomes(("parents",))]
        exact = parents and all(self.clip(genome) == genome and self._unclipped(genome) for _, genome in parents)
        return parents if exact else None

    def parent_refs(self) -> list[str]:
        """The models `parent_genomes` (where exact) or `parent_config` show alone: both ends of t (for SLERP the
        base is the t = 0 parent), else each searched model."""
        if self.parent_genomes() is not None and "t" in self.study.space.params and len(self.model_refs) == 2:
            return list(self.model_refs)
        return [self.model_refs[m] for m in self.searched_models]

    def _unclipped(self, genome: dict[str, float]) -> bool:
        wanted = {"t": (0.0, 1.0), "weight": (0.0, 1.0), "density": (1.0,)}
        return all(genome[g.name] in wanted.get(g.param, (genome[g.name],)) for g in self.genes)

    def parent_config(self, m: int) -> MergeConfig:
        """Model `m` alone as a config (linear, weight 1): the parent where the space cannot express it."""
        return self.alone_config(self.model_refs[m])

    def alone_config(self, ref: str) -> MergeConfig:
        """The model `ref` (a parent, the base) alone as a config: linear, weight 1, the merge's dtypes."""
        merge = self.study.merge_raw
        raw = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
        raw.update({k: merge[k] for k in ("dtype", "out_dtype", "tokenizer_source") if merge.get(k)})
        return parse_config(raw, where=f"model {ref} alone", base_dir=self.study.base_dir)

    def seed_genomes(self, kinds: tuple[str, ...] | None = None) -> list[tuple[str, dict[str, float]]]:
        """Named seed trials of the study's `seed_trials` (or of `kinds`): each parent alone (where the method
        can express it), uniform, defaults, the greedy soup."""
        seeds: list[tuple[str, dict[str, float]]] = []
        params = self.study.space.params
        defaults = self.default_values()
        kinds = self.study.seed_trials if kinds is None else kinds
        if "parents" in kinds:
            if "t" in params and len(self.model_refs) == 2:
                for i, t in enumerate((0.0, 1.0)):
                    seeds.append((f"parent {_short(self.model_refs[i])}", self.constant({**defaults, "t": t})))
            elif "weight" in params and self.study.space.per_model:
                for m in self.searched_models:
                    base = {**defaults, "weight": 0.0, "density": 1.0}
                    seeds.append((f"parent {_short(self.model_refs[m])}", self.constant(base, {m: {"weight": 1.0}})))
        if "uniform" in kinds:
            uniform = {**defaults, "weight": 1.0 if self._normalizes() else 1.0 / max(1, len(self.searched_models)),
                       "t": 0.5}
            seeds.append(("uniform", self.constant(uniform)))
        if "defaults" in kinds:
            seeds.append(("defaults", self.constant(defaults)))
        if "soup" in kinds and "weight" in params:
            seeds.append(("greedy soup", self.soup_genome(defaults)))
        unique, seen = [], set()
        for label, genome in seeds:
            key = tuple(sorted(genome.items()))
            if key not in seen:
                seen.add(key)
                unique.append((label, genome))
        return unique

    def soup_genome(self, defaults: dict[str, float]) -> dict[str, float]:
        """The soup of `soup_config` as a genome: equal weights on its ingredients, zero on the others."""
        soup = load_config(self.study.soup_config)
        chosen = {soup.resolve_model(m.model).resolve() for m in soup.models}
        members = [m for m in self.searched_models
                   if self.study.merge.resolve_model(self.model_refs[m]).resolve() in chosen]
        if not members:
            raise StudyError("none of the soup's checkpoints is among the study's models",
                             f"{self.study.path.name}: soup_config")
        weight = 1.0 if self._normalizes() else 1.0 / len(members)
        per_model = {m: {"weight": weight if m in members else 0.0} for m in self.searched_models}
        return self.constant({**defaults, "density": 1.0}, per_model)

    def _normalizes(self) -> bool:
        spec = self.method.params.get("normalize")
        raw = (self.study.merge_raw.get("parameters") or {}).get("normalize")
        return bool(raw if raw is not None else (spec.default if spec is not None else False))

    def profile(self, genome: dict[str, float]) -> dict[str, list[float]]:
        """Per-layer values of each (param, model, group) row, for plots and reports."""
        rows: dict[str, list[float]] = {}
        names = [_short(ref) for ref in self.model_refs]
        if len(set(names)) < len(names):
            names = [f"m{i}" for i in range(len(names))]
        for g in self.genes:
            model = names[g.model] if g.model is not None else None
            key = ".".join(p for p in [g.param, model, g.group] if p)
            rows.setdefault(key, []).append(float(genome[g.name]))
        return rows
