"""What a merge sets up before any tensor is read, shared by the in-memory engine and the streaming writer: the
device, the opened sources, the plan, the compute and output dtypes, the output config.json, the tokenizer folder,
and the one builder of a live transformers model.

Reads headers and config files only; never loads or merges a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.config import MergeConfig, ModelRef
from merge_core.errors import MergeConfigError
from merge_core.lora import AdapterSource
from merge_core.plan import TensorTask, layer_count_key, output_layers, plan_sources
from merge_core.sources import ModelSource, torch_dtype


def pick_device(spec: str | torch.device | None = "auto") -> torch.device:
    """auto -> cuda when available, else cpu; anything else as torch understands it."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise MergeConfigError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:i)", "--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeConfigError("CUDA was requested but no GPU is available", "--device")
    return device


def stored_float_dtype(sources) -> torch.dtype:
    """The promoted dtype of the float tensors stored in `sources` (float32 when there are none)."""
    found = {m.dtype for s in sources for m in s.meta.values() if m.dtype.is_floating_point}
    dtype = found.pop() if found else torch.float32
    for other in found:
        dtype = torch.promote_types(dtype, other)
    return dtype


@dataclass
class Prepared:
    """A merge ready to run: opened sources (headers only), the plan, dtypes and the device."""

    config: MergeConfig
    device: torch.device
    sources: dict[str, ModelSource]
    plan: list[TensorTask]
    compute_dtype: torch.dtype      # the config's dtype, else (as mergekit) the sources' promoted float dtype
    out_dtype: torch.dtype          # out_dtype, else the compute dtype

    @property
    def lead(self) -> ModelSource:
        """The base model (else the first): its config.json and generation config are the output's."""
        config = self.config
        return self.sources[config.base_model] if config.base_model in self.sources else next(iter(self.sources.values()))

    def model_config(self) -> dict:
        """config.json of the merged model: the lead model's, with the output layer count and dtype."""
        out = dict(self.lead.config)
        layers = output_layers(self.plan)
        if layers is not None:
            out[layer_count_key(self.lead.arch, out)] = layers
        if out.get("tie_word_embeddings") and any(t.out_name == "lm_head.weight" for t in self.plan):
            out["tie_word_embeddings"] = False   # a tied base merged with untied models gets its own head
        out["torch_dtype"] = str(self.out_dtype).removeprefix("torch.")
        out["dtype"] = out["torch_dtype"]
        return out

    def tokenizer_folder(self) -> Path:
        """Whose tokenizer the merged model uses: tokenizer_source (a model or 'base'), else base, else first."""
        source = self.config.tokenizer_source
        if source and source not in ("base", "union"):
            return self.config.resolve_model(source)
        return self.lead.path

    def input_folders(self) -> list[Path]:
        """Every folder the merge reads (models and the tokenizer's): an output must never replace one."""
        return [s.path for s in self.sources.values()] + [self.tokenizer_folder()]


def open_models(config, allow_pickle: bool = False) -> dict[str, ModelSource]:
    """Open every model a MergeConfig references (keyed by the reference as written): local folders, Hub ids from
    the local cache, and LoRA adapters (BASE+ADAPTER, or an adapter folder) applied to their base. A base folder
    used by several references is opened once."""
    opened: dict[Path, ModelSource] = {}
    out: dict[str, ModelSource] = {}
    refs = config.referenced_models()
    resolved = {ref: config.resolve_ref(ref) for ref in refs}
    for ref in sorted(refs, key=lambda r: resolved[r].adapter is not None):   # plain references first
        where = resolved[ref]
        key = where.model.resolve() if where.model.exists() else where.model
        if where.adapter is None:
            out[ref] = ModelSource(where.model, ref=ref, allow_pickle=allow_pickle)
            opened.setdefault(key, out[ref])
            continue
        base = opened.get(key)
        if base is None:
            base = opened[key] = ModelSource(where.model, ref=ModelRef.parse(ref).model, allow_pickle=allow_pickle)
        out[ref] = AdapterSource(base, where.adapter, ref, allow_pickle)
    return {ref: out[ref] for ref in refs}


def prepare(config: MergeConfig, device: str | torch.device = "auto", allow_pickle: bool = False) -> Prepared:
    """Open the config's models (raising MergeConfigError for any that is missing, damaged or incompatible) and
    plan the merge."""
    dev = pick_device(device)
    sources = open_models(config, allow_pickle)
    plan = plan_sources(config, sources)
    compute = torch_dtype(config.dtype, "dtype") or stored_float_dtype(sources.values())
    return Prepared(config, dev, sources, plan, compute, torch_dtype(config.out_dtype, "out_dtype") or compute)


def build_model(model_config: dict, device: torch.device, dtype: torch.dtype):
    """An empty live transformers model (no weight initialization) for a config.json, in eval mode, no grads.
    Only architectures transformers itself implements: trust_remote_code is never on."""
    # transformers takes ~1 s to import: `mergesearch merge` (which builds no model) starts without it.
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    settings = dict(model_config)
    model_type = settings.pop("model_type", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **settings)
    except (ValueError, KeyError) as err:
        raise MergeConfigError(f"unsupported model_type {model_type!r}: {err}", "config.json") from None
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: Path):
    """The tokenizer saved in `folder` (never running code from it); MergeConfigError if there is none."""
    from transformers import AutoTokenizer   # lazy, as in build_model

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise MergeConfigError(f"cannot load a tokenizer from {folder}: {err}", "tokenizer_source") from None
