"""The mergekit 0.1.5 merge config as frozen dataclasses: parse + validate (naming the field at fault), dump.

Knows the methods only through their declared parameters and model counts; it resolves no tensor-level values.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Union

import yaml

from merge_core.errors import MergeConfigError
from merge_core.hub import cached_snapshot, find_hub, is_hub_id, not_found_hint
from merge_core.methods import MergeMethod, Param, get_method

log = logging.getLogger(__name__)

Scalar = Union[bool, int, float, str]


@dataclass(frozen=True)
class FilteredValue:
    """One entry of a filter list: `value` (scalar or gradient) for tensors whose name contains `filter`.

    An entry without filter (or with filter `*`) matches every tensor.
    """

    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


# A parameter setting: a scalar, a gradient (tuple of scalars) or a filter list (tuple of FilteredValue).
Setting = Union[Scalar, tuple[Scalar, ...], tuple[FilteredValue, ...]]
Parameters = dict[str, Setting]


@dataclass(frozen=True)
class InputModel:
    """An entry of `models:`."""

    model: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True)
class InputSlice:
    """A source of an output slice: layers [start, end) of `model`."""

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """An entry of `slices:`: sources merged layer by layer into consecutive output layers."""

    sources: tuple[InputSlice, ...]
    base_model: str | None = None
    residual_weight: float | None = None   # in mergekit's schema, unused by its planner
    parameters: Parameters = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


@dataclass(frozen=True)
class MergeConfig:
    """A validated mergekit config. Model references are kept as written; `resolve_model` finds the folder."""

    merge_method: str
    models: tuple[InputModel, ...] = ()
    slices: tuple[OutputSlice, ...] = ()
    base_model: str | None = None
    parameters: Parameters = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    base_dir: Path | None = field(default=None, compare=False)  # folder of the YAML file, for relative paths

    def resolve_model(self, ref: str) -> Path:
        """The folder holding the config.json of model reference `ref` (for BASE+ADAPTER or an adapter folder: the
        base model's). Relative paths are taken against the YAML file's folder; Hub ids come from the local cache."""
        return self.resolve_ref(ref).model

    def resolve_ref(self, ref: str) -> "ResolvedRef":
        """Model reference `ref` as folders: the model, and the LoRA adapter applied to it (None without one)."""
        return resolve_ref(ref, self.base_dir)

    @cached_property
    def structure(self) -> str:
        """Everything of the config but its parameter values (method, models, slices, dtypes, tokenizer), as one
        string: what an engine's resident inputs depend on. Computed once per config; `with_parameters` carries
        it to the configs it makes."""
        def strip(node):
            if isinstance(node, dict):
                return {k: strip(v) for k, v in node.items() if k != "parameters"}
            if isinstance(node, list):
                return [strip(v) for v in node]
            return node

        return json.dumps(strip(config_to_dict(self)), sort_keys=True)

    def with_parameters(self, parameters: Parameters, model_parameters: list[Parameters]) -> MergeConfig:
        """The same merge (a `models:` config) with other parameter values: top level and per model, in order.
        The values are taken as valid (a search space checked their ranges once)."""
        if len(model_parameters) != len(self.models):
            raise ValueError("one parameter mapping per model")
        models = tuple(replace(m, parameters=p) for m, p in zip(self.models, model_parameters))
        changed = replace(self, parameters=parameters, models=models)
        changed.__dict__["structure"] = self.structure
        return changed

    def referenced_models(self) -> list[str]:
        """Every model reference, each once, in order of first appearance (base model last if not listed)."""
        refs: list[str] = [m.model for m in self.models]
        refs += [src.model for s in self.slices for src in s.sources]
        refs += [s.base_model for s in self.slices if s.base_model]
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))


# ---- parsing -------------------------------------------------------------------------------------

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "modules"}
DTYPES = ("bfloat16", "float16", "float32", "float64")


def _at(where: str, field_path: str) -> str:
    if not where:
        return field_path
    return f"{where}: {field_path}" if where.endswith((".yaml", ".yml")) else f"{where}.{field_path}"


def _fail(message: str, where: str, field_path: str) -> MergeConfigError:
    return MergeConfigError(message, _at(where, field_path))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_keys(data: dict, allowed: set[str], where: str, field_path: str) -> None:
    for key in data:
        if key not in allowed:
            loc = f"{field_path}.{key}" if field_path else str(key)
            raise _fail(f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})", where, loc)


def _mapping(value: Any, where: str, field_path: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(f"expected a mapping, got {_type_name(value)}", where, field_path)
    return value


def _string(value: Any, where: str, field_path: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(f"expected a non-empty string, got {_type_name(value)}", where, field_path)
    return value


def _model_ref(value: Any, where: str, field_path: str) -> str:
    """A model reference as mergekit reads it: MODEL[@REVISION][+ADAPTER[@REVISION]] (paths or Hub ids)."""
    ref = _string(value, where, field_path)
    parts = ref.split("+")
    if len(parts) > 2:
        raise _fail(f"{ref!r}: a model reference has at most one '+' (MODEL+LORA_ADAPTER)", where, field_path)
    for part in parts:
        name, at, revision = part.partition("@")
        if not name or (at and not revision) or "@" in revision:
            raise _fail(f"{ref!r}: expected MODEL[@REVISION][+ADAPTER[@REVISION]]", where, field_path)
    return ref


def convert_value(value: Any, spec: Param, name: str, where: str, field_path: str) -> Scalar:
    """One scalar of a setting, as the parameter's type (mergekit's pydantic coercions), range-checked."""
    kind = spec.kind
    bad = _fail(f"{name} expects {kind.__name__}, got {value!r}", where, field_path)
    if kind is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, (int, float)) and value in (0, 1):
            out = bool(value)
        elif isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            out = _BOOL_WORDS[value.strip().lower()]
        else:
            raise bad
        return out
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise bad from None
    elif isinstance(value, (int, float)):  # bool included, as pydantic's lax mode
        number = float(value)
    else:
        raise bad
    if not math.isfinite(number):
        raise _fail(f"{name} must be finite, got {value!r}", where, field_path)
    if kind is int:
        if number != int(number):
            raise bad
        out = int(number)
    else:
        out = number
    if (spec.low is not None and out < spec.low) or (spec.high is not None and out > spec.high):
        low = "-inf" if spec.low is None else spec.low
        high = "inf" if spec.high is None else spec.high
        raise _fail(f"{name} must be in [{low}, {high}], got {value!r}", where, field_path)
    return out


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
               "1": True, "0": False, "t": True, "f": False, "y": True, "n": False}


def _scalar_or_gradient(value: Any, spec: Param, name: str, where: str, field_path: str
                        ) -> Scalar | tuple[Scalar, ...]:
    if isinstance(value, list):
        if not value:
            raise _fail(f"{name}: empty gradient list", where, field_path)
        return tuple(convert_value(v, spec, name, where, f"{field_path}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict) or value is None:
        raise _fail(f"{name} expects a number, a gradient list or a filter list, got {_type_name(value)}",
                    where, field_path)
    return convert_value(value, spec, name, where, field_path)


def _setting(value: Any, spec: Param, name: str, where: str, field_path: str) -> Setting:
    """A scalar, a gradient list, or a filter list (`- filter: ..` / `value: ..`; a lone mapping counts as one)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        entries = []
        for i, entry in enumerate(value):
            loc = f"{field_path}[{i}]"
            if not isinstance(entry, dict):
                raise _fail(f"{name}: a filter list holds only `filter:`/`value:` entries, got {entry!r}",
                            where, loc)
            _check_keys(entry, {"filter", "value"}, where, loc)
            if "value" not in entry:
                raise _fail(f"{name}: filter entry without `value`", where, loc)
            filt = entry.get("filter")
            if filt is not None and not isinstance(filt, str):
                raise _fail(f"{name}: filter must be a string, got {_type_name(filt)}", where, f"{loc}.filter")
            entries.append(FilteredValue(_scalar_or_gradient(entry["value"], spec, name, where, f"{loc}.value"),
                                         filt))
        return tuple(entries)
    return _scalar_or_gradient(value, spec, name, where, field_path)


def _parameters(data: Any, method: MergeMethod, where: str, field_path: str, per_model: bool) -> Parameters:
    """A `parameters:` block. At model/source level only per-model parameters take effect (as in mergekit)."""
    if data is None:
        return {}
    data = _mapping(data, where, field_path)
    out: Parameters = {}
    for name, value in data.items():
        loc = f"{field_path}.{name}"
        spec = method.model_params.get(name) or method.params.get(name)
        if spec is None:
            known = sorted({*method.model_params, *method.params})
            raise _fail(f"unknown parameter {name!r} for merge method {method.name} "
                        f"(known: {', '.join(known) or 'none'})", where, loc)
        if per_model and name not in method.model_params:
            log.warning("%s: %r is a method-level parameter of %s and has no effect here (as in mergekit); "
                        "put it in the top-level or slice parameters", _at(where, loc), name, method.name)
        out[name] = _setting(value, spec, name, where, loc)
    return out


def _layer_range(value: Any, where: str, field_path: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _fail(f"layer_range must be [start, end] (two integers), got {value!r}", where, field_path)
    start, end = value
    if start < 0 or end <= start:
        raise _fail(f"layer_range must satisfy 0 <= start < end, got {list(value)}", where, field_path)
    return (start, end)


def _dtype(value: Any, where: str, field_path: str) -> str | None:
    if value is None:
        return None
    name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
    if name not in DTYPES:
        raise _fail(f"unknown dtype {value!r} (use one of: {', '.join(DTYPES)})", where, field_path)
    return value


def _tokenizer(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    data = _mapping(value, where, "tokenizer")
    _check_keys(data, {"source", "tokens", "pad_to_multiple_of"}, where, "tokenizer")
    if "source" in data:
        _string(data["source"], where, "tokenizer.source")
    tokens = data.get("tokens")
    if tokens is not None:
        for tok, spec in _mapping(tokens, where, "tokenizer.tokens").items():
            loc = f"tokenizer.tokens.{tok}"
            _check_keys(_mapping(spec, where, loc), {"source", "force"}, where, loc)
            if "force" in spec and not isinstance(spec["force"], bool):
                raise _fail("force must be true or false", where, f"{loc}.force")
    pad = data.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise _fail(f"pad_to_multiple_of must be a positive integer, got {pad!r}", where,
                    "tokenizer.pad_to_multiple_of")
    return yaml.safe_load(yaml.safe_dump(data))  # a deep, plain copy


def _check_inputs(method: MergeMethod, refs: list[str], base: str | None, where: str, field_path: str,
                  base_field: str) -> None:
    """mergekit's input contract for one group of inputs (models + base, or one slice's sources)."""
    if len(set(refs)) != len(refs):
        dup = next(r for r in refs if refs.count(r) > 1)
        raise _fail(f"model {dup!r} is listed twice", where, field_path)
    has_base = method.uses_base and base is not None
    if has_base and base not in refs:
        raise _fail(f"base model {base!r} is not among this slice's sources", where, field_path)
    if method.requires_base and not has_base:
        raise _fail(f"merge method {method.name} needs a base_model", where, base_field)
    count = len(refs)
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        raise _fail(_count_message(method.name, count, method.min_models, method.max_models, False),
                    where, field_path)
    if method.uses_base:
        non_base = count - int(has_base)
        if non_base < method.min_non_base or (method.max_non_base is not None and non_base > method.max_non_base):
            raise _fail(_count_message(method.name, non_base, method.min_non_base, method.max_non_base, True),
                        where, field_path)


def _count_message(name: str, count: int, low: int, high: int | None, besides_base: bool) -> str:
    if high is None:
        want = f"at least {low}"
    elif high == low:
        want = f"exactly {low}"
    else:
        want = f"{low} to {high}"
    noun = "model" if high == 1 or (high is None and low == 1) else "models"
    which = "besides the base" if besides_base else "(counting the base model)"
    return f"merge method {name} takes {want} {noun} {which}, got {count}"


def parse_config(data: dict, where: str = "config", base_dir: Path | None = None) -> MergeConfig:
    """Validate a mergekit config (a dict, as from YAML) into a MergeConfig; errors name the field at fault."""
    data = _mapping(data, where, "(top level)")
    _check_keys(data, TOP_KEYS, where, "")
    if data.get("modules") is not None:
        raise _fail("`modules:` (multi-module models) is not supported; use models: or slices:", where, "modules")
    if "merge_method" not in data:
        raise _fail("missing merge_method", where, "merge_method")
    name = _string(data["merge_method"], where, "merge_method")
    try:
        method = get_method(name)
    except MergeConfigError as err:
        raise _fail(str(err).split(": ", 1)[1], where, "merge_method") from None

    base = _model_ref(data["base_model"], where, "base_model") if data.get("base_model") is not None else None
    models_raw, slices_raw = data.get("models"), data.get("slices")
    if bool(models_raw) == bool(slices_raw):
        raise _fail("give exactly one of `models:` or `slices:` (non-empty)", where, "(top level)")

    models: list[InputModel] = []
    if models_raw:
        if not isinstance(models_raw, list):
            raise _fail(f"expected a list, got {_type_name(models_raw)}", where, "models")
        for i, entry in enumerate(models_raw):
            loc = f"models[{i}]"
            if isinstance(entry, str):  # a bare reference, as mergekit's pydantic accepts neither: be explicit
                raise _fail("write each model as `- model: PATH`", where, loc)
            entry = _mapping(entry, where, loc)
            _check_keys(entry, {"model", "parameters"}, where, loc)
            if "model" not in entry:
                raise _fail("missing `model`", where, loc)
            models.append(InputModel(_model_ref(entry["model"], where, f"{loc}.model"),
                                     _parameters(entry.get("parameters"), method, where, f"{loc}.parameters", True)))
        refs = [m.model for m in models]
        if base is not None and base not in refs:
            refs.append(base)  # mergekit merges the base as an extra input
        _check_inputs(method, refs, base, where, "models", "base_model")

    slices: list[OutputSlice] = []
    if slices_raw:
        if not isinstance(slices_raw, list):
            raise _fail(f"expected a list, got {_type_name(slices_raw)}", where, "slices")
        for i, entry in enumerate(slices_raw):
            slices.append(_slice(entry, method, base, where, f"slices[{i}]"))

    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise _fail("give either tokenizer_source or tokenizer, not both", where, "tokenizer")
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source is not None:
        tokenizer_source = _string(tokenizer_source, where, "tokenizer_source")
    chat_template = _string(data.get("chat_template"), where, "chat_template", optional=True)

    return MergeConfig(
        merge_method=name,
        models=tuple(models),
        slices=tuple(slices),
        base_model=base,
        parameters=_parameters(data.get("parameters"), method, where, "parameters", False),
        dtype=_dtype(data.get("dtype"), where, "dtype"),
        out_dtype=_dtype(data.get("out_dtype"), where, "out_dtype"),
        tokenizer_source=tokenizer_source,
        tokenizer=_tokenizer(data.get("tokenizer"), where),
        chat_template=chat_template,
        base_dir=Path(base_dir) if base_dir is not None else None,
    )


def _slice(entry: Any, method: MergeMethod, top_base: str | None, where: str, loc: str) -> OutputSlice:
    entry = _mapping(entry, where, loc)
    _check_keys(entry, {"sources", "base_model", "residual_weight", "parameters"}, where, loc)
    raw_sources = entry.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise _fail("a slice needs a non-empty `sources:` list", where, f"{loc}.sources")
    sources = []
    for j, src in enumerate(raw_sources):
        sloc = f"{loc}.sources[{j}]"
        src = _mapping(src, where, sloc)
        _check_keys(src, {"model", "layer_range", "parameters"}, where, sloc)
        for key in ("model", "layer_range"):
            if key not in src:
                raise _fail(f"missing `{key}`", where, sloc)
        sources.append(InputSlice(_model_ref(src["model"], where, f"{sloc}.model"),
                                  _layer_range(src["layer_range"], where, f"{sloc}.layer_range"),
                                  _parameters(src.get("parameters"), method, where, f"{sloc}.parameters", True)))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        raise _fail(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}",
                    where, f"{loc}.sources")
    base = _model_ref(entry["base_model"], where, f"{loc}.base_model") if entry.get("base_model") else None
    residual = entry.get("residual_weight")
    if residual is not None and (not isinstance(residual, (int, float)) or isinstance(residual, bool)):
        raise _fail(f"residual_weight must be a number, got {residual!r}", where, f"{loc}.residual_weight")
    _check_inputs(method, [s.model for s in sources], base or top_base, where, f"{loc}.sources",
                  f"{loc}.base_model" if base is None and top_base is None else "base_model")
    return OutputSlice(tuple(sources), base, None if residual is None else float(residual),
                       _parameters(entry.get("parameters"), method, where, f"{loc}.parameters", False))


@dataclass(frozen=True)
class ModelRef:
    """The parts of a model reference: MODEL[@REVISION][+ADAPTER[@REVISION]]."""

    model: str
    revision: str | None = None
    adapter: str | None = None
    adapter_revision: str | None = None

    @staticmethod
    def parse(ref: str) -> "ModelRef":
        model, _, adapter = ref.partition("+")
        name, _, rev = model.partition("@")
        lora, _, lora_rev = adapter.partition("@")
        return ModelRef(name, rev or None, lora or None, lora_rev or None)


@dataclass(frozen=True)
class ResolvedRef:
    """Where a model reference lives: the model folder (with config.json) and the LoRA adapter folder, if any."""

    model: Path
    adapter: Path | None = None


def resolve_ref(ref: str, base_dir: Path | None) -> ResolvedRef:
    """The folders of a model reference. Each part is a local path (relative to `base_dir`), else a Hub id found in
    the local Hub cache (or downloaded, when allowed: see merge_core.hub). A PEFT adapter folder given alone is
    applied to the base model its adapter_config.json names."""
    where = f"model {ref}"
    parts = ModelRef.parse(ref)
    model = _resolve_part(parts.model, parts.revision, base_dir, "model", where)
    if parts.adapter is not None:
        return ResolvedRef(model, _resolve_part(parts.adapter, parts.adapter_revision, base_dir, "adapter", where))
    if (model / "adapter_config.json").is_file() and not (model / "config.json").is_file():
        return ResolvedRef(_adapter_base(model, base_dir, where), model)
    return ResolvedRef(model)


def _resolve_part(name: str, revision: str | None, base_dir: Path | None, kind: str, where: str) -> Path:
    """A local path when it exists, else a Hub id's cached (or, when allowed, downloaded) snapshot, else the local
    path (the caller's 'not found' error names both places)."""
    full = name if revision is None else f"{name}@{revision}"
    local = resolve_path(full, base_dir)
    if local.exists():
        return local
    if is_hub_id(name):
        found = find_hub(name, revision, kind, where)
        if found is not None:
            return found
    elif revision is not None:
        raise MergeConfigError(f"@{revision}: revisions are for Hugging Face Hub ids (org/name), and {name} is "
                               "not one", where)
    return local


def _adapter_base(adapter: Path, base_dir: Path | None, where: str) -> Path:
    """The base model of an adapter folder: its adapter_config.json's base_model_name_or_path (a path, relative to
    the YAML's folder or to the adapter's parent, or a Hub id)."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise MergeConfigError(f"unreadable adapter_config.json: {err}", where) from None
    if not base:
        raise MergeConfigError("adapter_config.json names no base model (base_model_name_or_path); write the "
                               "reference as BASE+ADAPTER", where)
    for candidate in (resolve_path(base, base_dir), adapter.parent / base):
        if candidate.is_dir():
            return candidate
    found = _resolve_part(base, None, None, "model", where)
    if not found.is_dir():
        raise MergeConfigError(f"the adapter's base model {base!r} (base_model_name_or_path in adapter_config.json) "
                               f"was not found{not_found_hint(base)}; write the reference as BASE+ADAPTER", where)
    return found


def resolve_path(value: str | Path, base_dir: Path | None) -> Path:
    """A path written in a YAML file: `~` expanded, relative paths taken against the file's folder `base_dir`,
    `..` and `.` folded (symbolic links are kept as written)."""
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return Path(os.path.normpath(path))


def read_yaml_mapping(path: str | Path, kind: str = "config", error: type[ValueError] = MergeConfigError) -> dict:
    """A YAML file that must hold a mapping (a leading UTF-8 BOM is fine). A missing or unreadable file, a syntax
    error (with its line) or another top-level type raises `error(message, where)` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{kind} file not found", str(path)) from None
    except IsADirectoryError:
        raise error(f"is a folder, not a {kind} file", str(path)) from None
    except OSError as err:
        raise error(f"cannot read {kind} file: {err.strerror or err}", str(path)) from None
    except UnicodeDecodeError as err:
        raise error(f"not a UTF-8 text file ({err.reason} at byte {err.start})", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"invalid YAML: {problem}", where) from None
    if not isinstance(data, dict):
        raise error(f"a {kind} file must be a YAML mapping, got {_type_name(data)}", str(path))
    return data


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML file; relative model paths resolve against its folder."""
    path = Path(path)
    return parse_config(read_yaml_mapping(path), where=str(path), base_dir=path.resolve().parent)


# ---- dumping ---------------------------------------------------------------------------------------

def _setting_to_plain(setting: Setting) -> Any:
    if isinstance(setting, tuple):
        if setting and isinstance(setting[0], FilteredValue):
            out = []
            for entry in setting:
                item: dict[str, Any] = {"filter": entry.filter} if entry.filter is not None else {}
                item["value"] = list(entry.value) if isinstance(entry.value, tuple) else entry.value
                out.append(item)
            return out
        return list(setting)
    return setting


def _params_to_plain(params: Parameters) -> dict[str, Any]:
    return {name: _setting_to_plain(value) for name, value in params.items()}


def config_to_dict(cfg: MergeConfig, absolute_paths: bool = False) -> dict[str, Any]:
    """The config as a plain mergekit dict (model references as written, or resolved with absolute_paths)."""
    ref = (lambda r: _absolute_ref(r, cfg.base_dir)) if absolute_paths else (lambda r: r)
    out: dict[str, Any] = {"merge_method": cfg.merge_method}
    if cfg.base_model is not None:
        out["base_model"] = ref(cfg.base_model)
    if cfg.models:
        out["models"] = []
        for m in cfg.models:
            item: dict[str, Any] = {"model": ref(m.model)}
            if m.parameters:
                item["parameters"] = _params_to_plain(m.parameters)
            out["models"].append(item)
    if cfg.slices:
        out["slices"] = []
        for s in cfg.slices:
            sources = []
            for src in s.sources:
                item = {"model": ref(src.model), "layer_range": list(src.layer_range)}
                if src.parameters:
                    item["parameters"] = _params_to_plain(src.parameters)
                sources.append(item)
            entry: dict[str, Any] = {"sources": sources}
            if s.base_model is not None:
                entry["base_model"] = ref(s.base_model)
            if s.residual_weight is not None:
                entry["residual_weight"] = s.residual_weight
            if s.parameters:
                entry["parameters"] = _params_to_plain(s.parameters)
            out["slices"].append(entry)
    if cfg.parameters:
        out["parameters"] = _params_to_plain(cfg.parameters)
    for key in ("dtype", "out_dtype", "chat_template"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    if cfg.tokenizer_source is not None:
        out["tokenizer_source"] = cfg.tokenizer_source if cfg.tokenizer_source in ("base", "union") \
            else ref(cfg.tokenizer_source)
    if cfg.tokenizer is not None:
        out["tokenizer"] = yaml.safe_load(yaml.safe_dump(cfg.tokenizer))
    return out


def _absolute_ref(ref: str, base_dir: Path | None) -> str:
    """A model reference with its local parts made absolute (Hub ids, revisions and '+' kept)."""
    def part(name: str, revision: str | None, kind: str) -> str:
        full = name if revision is None else f"{name}@{revision}"
        local = resolve_path(full, base_dir)
        if not local.exists() and is_hub_id(name) and cached_snapshot(name, revision, kind) is not None:
            return full         # a Hub id: mergekit finds it in the same cache
        return os.path.abspath(local)

    parts = ModelRef.parse(ref)
    out = part(parts.model, parts.revision, "model")
    return out if parts.adapter is None else f"{out}+{part(parts.adapter, parts.adapter_revision, 'adapter')}"


class _Dumper(yaml.SafeDumper):
    """Lists of numbers in flow style ([0, 0.5, 1]), everything else in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_config(cfg: MergeConfig, absolute_paths: bool = False) -> str:
    """YAML that mergekit-yaml accepts and that means the same merge."""
    return yaml.dump(config_to_dict(cfg, absolute_paths), Dumper=_Dumper, sort_keys=False,
                     default_flow_style=False, allow_unicode=True)
