"""Parameter resolution: gradients, filters and the fallback chain, checked against mergekit's own resolver."""

from __future__ import annotations

import pytest

from merge_core.config import parse_config
from merge_core.errors import MergeConfigError
from merge_core.methods import get_method
from merge_core.methods.base import Param
from merge_core.params import interpolate, resolve_param, resolve_setting
from merge_core.plan import plan_merge, resolve_tensor_params

NAMES = ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.2.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight", ""]
TS = [0.0, 0.1, 1 / 3, 0.5, 0.74, 0.9999, 1.0]
SETTINGS = [
    0.25,
    [0.0, 1.0],
    [0.1, 0.9, 0.3],
    [1, 2, 4, 8, 16],
    [0.7],
    [True, False, True],
    [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": [0.9, 0.1]}],
    [{"filter": "layernorm", "value": 0.2}, {"filter": "*", "value": 0.6}],
    [{"filter": "q_proj", "value": 0.4}],                      # no catch-all: None elsewhere
    {"filter": "mlp", "value": [0.2, 0.4]},                    # a lone mapping is a one-entry filter list
    [{"filter": "lm_head", "value": 0.1}, {"filter": "self_attn", "value": 0.2}, {"value": 0.3}],
]


def _ours(setting, kind=float):
    """Our parsed form of a raw setting: a top-level ties parameter (lambda: float, normalize: bool)."""
    name = "normalize" if kind is bool else "lambda"
    config = {"merge_method": "ties", "base_model": "b", "models": [{"model": "b"}], "parameters": {name: setting}}
    return parse_config(config).parameters[name]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(i) for i in range(len(SETTINGS))])
def test_resolve_setting_equals_mergekit(setting):
    from mergekit.config import ParameterSetting, evaluate_setting
    from pydantic import TypeAdapter

    kind = bool if setting == [True, False, True] else float
    theirs_setting = TypeAdapter(ParameterSetting).validate_python(setting)
    validate = TypeAdapter(kind).validate_python
    ours_setting = _ours(setting, kind)
    for name in NAMES:
        for t in TS:
            expected = evaluate_setting(name, theirs_setting, t, validate=validate)
            got = resolve_setting(ours_setting, name, t)
            assert got == expected and type(got) is type(expected), (name, t, got, expected)


def test_gradient_interpolation_is_piecewise_linear():
    values = (0.0, 1.0, 0.0)
    assert interpolate(values, 0.25) == pytest.approx(0.5)
    assert interpolate(values, 0.5) == 1.0
    assert interpolate(values, 1.0) == 0.0
    assert interpolate((1.0, 2.0, 3.0, 4.0), 1 / 3) == pytest.approx(2.0)   # one value per layer
    assert interpolate((True, False), 0.99) is True                          # non-numeric: entry int(s)


def test_resolve_param_chain_and_defaults():
    spec = Param(0.5, float)
    assert resolve_param("density", spec, ({"density": 0.1}, {"density": 0.9}), "x", 0.0) == 0.1
    assert resolve_param("density", spec, (None, {"density": 0.9}), "x", 0.0) == 0.9
    only_attn = {"density": _ours([{"filter": "self_attn", "value": 0.2}])}
    assert resolve_param("density", spec, (only_attn, {"density": 0.9}), "model.layers.0.mlp.up_proj", 0) == 0.9
    assert resolve_param("density", spec, (only_attn,), "model.layers.0.mlp.up_proj", 0) == 0.5
    with pytest.raises(MergeConfigError, match="weight"):
        resolve_param("weight", Param(None, float, required=True), ({},), "model.norm.weight", 0.0)
    assert resolve_param("max_iter", Param(10, int), ({"max_iter": (2.0, 4.0)},), "x", 0.5) == 3
    with pytest.raises(MergeConfigError, match="not an integer"):
        resolve_param("max_iter", Param(10, int), ({"max_iter": (2.0, 3.0)},), "x", 0.5)


def _fake_model(layers: int) -> list[str]:
    """The tensor names of a Llama with `layers` layers, as the architecture table lists them."""
    from merge_core.architectures import find_architecture

    llama = find_architecture({"architectures": ["LlamaForCausalLM"]})
    return [w.name for w in llama.all_weights({"num_hidden_layers": layers})]


def test_fallback_chain_source_slice_top_default_in_a_sliced_config():
    cfg = parse_config({
        "merge_method": "ties", "base_model": "b",
        "parameters": {"density": 0.9, "weight": 0.1, "lambda": [1.0, 2.0]},
        "slices": [
            {"sources": [{"model": "b", "layer_range": [0, 3]},
                         {"model": "a", "layer_range": [0, 3],
                          "parameters": {"weight": [{"filter": "self_attn", "value": [0.0, 1.0]}]}}],
             "parameters": {"density": [{"filter": "mlp", "value": 0.3}]}},
            {"sources": [{"model": "b", "layer_range": [3, 4]}, {"model": "a", "layer_range": [1, 2]}]}]})
    names = {"a": _fake_model(4), "b": _fake_model(4)}
    tasks = {t.out_name: t for t in plan_merge(cfg, names, {"a": 4, "b": 4})}
    ties = get_method("ties")

    def values(name):
        params, per_model = resolve_tensor_params(cfg, ties, tasks[name])
        return params, per_model[tasks[name].sources.index(("a", tasks[name].sources[1][1]))]

    params, a = values("model.layers.1.self_attn.q_proj.weight")          # t = 1/2 in the first slice
    assert (a["weight"], a["density"], params["lambda"]) == (0.5, 0.9, 1.5)
    assert params["normalize"] is True and params["rescale"] is False     # ties' defaults
    _, a = values("model.layers.2.mlp.up_proj.weight")                    # slice filter wins over top level
    assert (a["weight"], a["density"]) == (0.1, 0.3)
    params, a = values("model.layers.3.self_attn.q_proj.weight")          # second slice: one layer, t = 1
    assert (a["weight"], a["density"], params["lambda"]) == (0.1, 0.9, 2.0)
    assert tasks["model.layers.3.self_attn.q_proj.weight"].sources[1] == ("a", "model.layers.1.self_attn.q_proj.weight")
    params, a = values("model.embed_tokens.weight")                       # outside the layers: t = 0
    assert (a["weight"], params["lambda"]) == (0.1, 1.0)
    assert tasks["model.embed_tokens.weight"].t == 0.0 and tasks["lm_head.weight"].t == 0.0
    base_values = resolve_tensor_params(cfg, ties, tasks["model.norm.weight"])[1][0]
    assert base_values == {}                                              # the base gets no per-model values


def test_base_of_a_base_ignoring_method_needs_its_own_weight():
    cfg = parse_config({"merge_method": "linear", "base_model": "b", "models": [{"model": "a",
                                                                                "parameters": {"weight": 1.0}}]})
    with pytest.raises(MergeConfigError) as err:
        plan_merge(cfg, {"a": _fake_model(2), "b": _fake_model(2)}, {"a": 2, "b": 2})
    assert err.value.where == "base_model.weight" and "base_model as one more input" in str(err.value)


def test_missing_weight_names_the_model_field():
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": "b",
                        "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}}]})
    with pytest.raises(MergeConfigError) as err:
        plan_merge(cfg, {"a": _fake_model(2), "b": _fake_model(2)}, {"a": 2, "b": 2})
    assert err.value.where == "models[0].parameters.weight"
