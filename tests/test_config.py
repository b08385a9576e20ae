"""The mergekit config schema: parsing, one MergeConfigError naming the field per mistake, and a dump that
mergekit itself reads back as the same merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merge_core.config import FilteredValue, MergeConfig, config_to_dict, dump_config, load_config, parse_config
from merge_core.errors import MergeConfigError


def ties(**extra) -> dict:
    config = {"merge_method": "ties", "base_model": "models/base",
              "models": [{"model": "models/a", "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": "models/b", "parameters": {"weight": 0.5, "density": 0.7}}]}
    config.update(extra)
    return config


VALID = {
    "ties-gradients-filters": ties(parameters={"normalize": False, "lambda": [1.0, 0.8],
                                               "density": [{"filter": "self_attn", "value": [0.2, 0.9]},
                                                           {"filter": "mlp", "value": 0.5}, {"value": 0.7}]},
                                   dtype="bfloat16", out_dtype="float16", tokenizer_source="base",
                                   chat_template="chatml"),
    "slerp": {"merge_method": "slerp", "base_model": "m/a", "models": [{"model": "m/a"}, {"model": "m/b"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                   {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
              "dtype": "float32"},
    "passthrough-slices": {"merge_method": "passthrough", "dtype": "float16",
                           "slices": [{"sources": [{"model": "m/a", "layer_range": [0, 24]}]},
                                      {"sources": [{"model": "m/b", "layer_range": [8, 32],
                                                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                                             {"value": 1.0}]}}]}]},
    "ties-slices": {"merge_method": "ties", "base_model": "m/base", "parameters": {"weight": 0.4},
                    "slices": [{"sources": [{"model": "m/base", "layer_range": [0, 4]},
                                            {"model": "m/a", "layer_range": [0, 4],
                                             "parameters": {"density": [0.1, 0.9]}}],
                                "parameters": {"lambda": 1.2}, "base_model": "m/base", "residual_weight": 0.5}]},
    "linear-tokenizer": {"merge_method": "linear", "models": [{"model": "m/a", "parameters": {"weight": 2}},
                                                              {"model": "m/b", "parameters": {"weight": 1}}],
                         "tokenizer": {"source": "union", "pad_to_multiple_of": 64,
                                       "tokens": {"<x>": {"source": "m/a", "force": True}}}},
    "della": {"merge_method": "della", "base_model": "m/base",
                                   "models": [{"model": "m/a", "parameters": {"weight": 1, "density": 0.5,
                                                                              "epsilon": 0.1}}]},
}


@pytest.mark.parametrize("name", list(VALID))
def test_dump_round_trips_through_mergekit(name):
    from mergekit.config import MergeConfiguration

    cfg = parse_config(VALID[name])
    text = dump_config(cfg)
    reread = yaml.safe_load(text)
    assert MergeConfiguration.model_validate(reread) == MergeConfiguration.model_validate(VALID[name])
    assert parse_config(reread) == cfg


def test_parsed_values_are_typed():
    cfg = parse_config(VALID["ties-gradients-filters"])
    assert cfg.models[0].parameters == {"weight": 1.0, "density": 0.5}
    assert cfg.parameters["lambda"] == (1.0, 0.8)
    assert cfg.parameters["density"][0] == FilteredValue((0.2, 0.9), "self_attn")
    assert cfg.parameters["density"][2] == FilteredValue(0.7, None)
    assert cfg.parameters["normalize"] is False
    # YAML reads 1e-3 as a string; mergekit's pydantic makes it a number: so do we
    numeric = parse_config(ties(parameters={"lambda": "1e-3", "normalize": "yes"}))
    assert numeric.parameters == {"lambda": 0.001, "normalize": True}


def test_config_to_dict_is_plain_and_keeps_references():
    data = config_to_dict(parse_config(VALID["passthrough-slices"]))
    assert data["slices"][1]["sources"][0] == {"model": "m/b", "layer_range": [8, 32], "parameters": {
        "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}
    assert "[0.0, 1.0]" in dump_config(parse_config(ties(parameters={"lambda": [0, 1]})))  # flow-style numbers


def test_relative_references_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "merge.yaml"
    path.write_text(yaml.safe_dump(ties()))
    cfg = load_config(path)
    assert cfg.base_model == "models/base"
    assert cfg.resolve_model("models/base") == tmp_path / "sub" / "models" / "base"
    assert cfg.resolve_model("/abs/model") == Path("/abs/model")
    assert parse_config(ties()).resolve_model("models/a") == Path("models/a")
    assert cfg.referenced_models() == ["models/a", "models/b", "models/base"]
    assert "models/base" in dump_config(cfg)
    assert config_to_dict(cfg, absolute_paths=True)["base_model"] == str(tmp_path / "sub" / "models" / "base")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n")
    with pytest.raises(MergeConfigError) as err:
        load_config(path)
    assert err.value.where.startswith(f"{path}:4:")
    with pytest.raises(MergeConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(MergeConfigError, match="mapping"):
        load_config(path)


def test_errors_from_a_file_name_file_and_field(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(ties(models=[{"model": "a", "parameters": {"weight": 1, "density": 2}}])))
    with pytest.raises(MergeConfigError) as err:
        load_config(path)
    assert err.value.where == f"{path}: models[0].parameters.density"


def _models(*entries, method="ties", base="b", **extra):
    config = {"merge_method": method, "models": [e if isinstance(e, dict) else {"model": e} for e in entries]}
    if base:
        config["base_model"] = base
    config.update(extra)
    return config


W = {"weight": 1.0}
ERRORS = [  # (config, field the error must name, a fragment of the message)
    (_models({"model": "a", "parameters": W}, method="tiez"), "merge_method", "known: arcee_fusion, breadcrumbs"),
    ({"models": [{"model": "a"}]}, "merge_method", "missing merge_method"),
    (_models({"model": "a", "parameters": {"weight": 1, "densty": 0.5}}), "models[0].parameters.densty",
     "unknown parameter 'densty'"),
    (_models({"model": "a", "parameters": W}, {"model": "c", "parameters": {"weight": 1, "density": 1.5}}),
     "models[1].parameters.density", "[0.0, 1.0]"),
    (_models({"model": "a", "parameters": {"weight": 1, "density": [0.5, -0.1]}}),
     "models[0].parameters.density[1]", "[0.0, 1.0]"),
    (_models({"model": "a", "parameters": {"weight": "heavy"}}), "models[0].parameters.weight", "expects float"),
    (_models({"model": "a", "parameters": {"weight": None}}), "models[0].parameters.weight", "null"),
    (_models({"model": "a", "parameters": {"weight": []}}), "models[0].parameters.weight", "empty gradient"),
    (_models({"model": "a", "parameters": {"weight": [{"filter": "mlp"}]}}), "models[0].parameters.weight[0]",
     "without `value`"),
    (_models({"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 1, "when": 2}]}}),
     "models[0].parameters.weight[0].when", "unknown key"),
    (_models({"model": "a", "parameters": {"weight": [{"value": []}]}}), "models[0].parameters.weight[0].value",
     "empty gradient"),
    (_models({"model": "a", "parameters": W}, parameters={"normalize": "maybe"}), "parameters.normalize",
     "expects bool"),
    (_models({"model": "a", "parameters": W}, parameters={"lambda": float("nan")}), "parameters.lambda", "finite"),
    (_models({"model": "a"}, method="karcher", base=None, parameters={"max_iter": 2.5}),
     "parameters.max_iter", "expects int"),
    (_models({"model": "a", "parameters": W}, parameters="fast"), "parameters", "mapping"),
    (_models({"model": "a", "parameters": W}, slices=[{"sources": [{"model": "a", "layer_range": [0, 1]}]}]),
     "(top level)", "exactly one of"),
    ({"merge_method": "ties", "base_model": "b"}, "(top level)", "exactly one of"),
    (_models({"model": "a", "parameters": W}, modules={"text": {}}), "modules", "not supported"),
    (_models({"model": "a", "parameters": W}, merge="now"), "merge", "unknown key"),
    (_models({"model": "a", "parameters": W}, {"model": "a", "parameters": W}), "models", "listed twice"),
    (_models({"model": "a", "parameters": W}, base=None), "base_model", "needs a base_model"),
    (_models("a", "c", method="slerp", base="a", parameters={"t": 0.5}) | {"models": [{"model": "a"},
                                                                                     {"model": "c"}, {"model": "d"}]},
     "models", "exactly 2 models"),
    (_models({"model": "a"}, method="slerp", base=None, parameters={"t": 0.5}), "base_model", "needs a base_model"),
    (_models({"model": "c"}, method="nearswap", base="a", parameters={"t": 0.5}) | {"models": [
        {"model": "c"}, {"model": "d"}]}, "models", "exactly 2 models"),
    (_models({"model": "c"}, method="model_stock"), "models", "at least 3 models"),
    (_models({"model": "c", "parameters": W}, method="nuslerp", base=None), "models",
     "takes exactly 2 models besides the base"),
    (_models({"model": "c"}, {"model": "d"}, method="passthrough", base=None), "models", "exactly 1 model ("),
    (_models({"model": "a", "parameters": W}, dtype="fp16"), "dtype", "unknown dtype"),
    (_models({"model": "a", "parameters": W}, out_dtype="int64"), "out_dtype", "unknown dtype"),
    ({"merge_method": "linear", "models": ["a"]}, "models[0]", "- model: PATH"),
    (_models({"parameters": W}), "models[0]", "missing `model`"),
    (_models({"model": "a+lora+more", "parameters": W}), "models[0].model", "at most one '+'"),
    (_models({"model": "a+", "parameters": W}), "models[0].model", "MODEL[@REVISION][+ADAPTER[@REVISION]]"),
    (_models({"model": "org/a@", "parameters": W}), "models[0].model", "MODEL[@REVISION]"),
    (_models({"model": "org/a@v1@v2", "parameters": W}), "models[0].model", "MODEL[@REVISION]"),
    (_models({"model": "", "parameters": W}), "models[0].model", "non-empty string"),
    (_models({"model": "a", "parameters": W}, tokenizer_source="base", tokenizer={"source": "base"}), "tokenizer",
     "not both"),
    (_models({"model": "a", "parameters": W}, tokenizer={"source": "base", "pad": 8}), "tokenizer.pad",
     "unknown key"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]},
     "slices[0].sources[0].layer_range", "0 <= start < end"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2, 4]}]}]},
     "slices[0].sources[0].layer_range", "two integers"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": "0-4"}]}]},
     "slices[0].sources[0].layer_range", "two integers"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a"}]}]}, "slices[0].sources[0]",
     "missing `layer_range`"),
    ({"merge_method": "passthrough", "slices": [{"sources": []}]}, "slices[0].sources", "non-empty"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [
        {"model": "b", "layer_range": [0, 2]}, {"model": "a", "layer_range": [0, 3]}]}]},
     "slices[0].sources", "same number of layers"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 2], "parameters": W}]}]}, "slices[0].sources",
     "not among this slice's sources"),
    ({"merge_method": "ties", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]},
     "slices[0].base_model", "needs a base_model"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}],
                                                 "residual_weight": "big"}]}, "slices[0].residual_weight", "number"),
]


@pytest.mark.parametrize("config,field,fragment", ERRORS, ids=[f"{i}-{e[1]}" for i, e in enumerate(ERRORS)])
def test_each_mistake_is_one_error_naming_its_field(config, field, fragment):
    with pytest.raises(MergeConfigError) as err:
        parse_config(config)
    assert err.value.where == f"config.{field}"
    assert fragment in str(err.value)


def test_method_level_parameter_at_model_level_warns_like_mergekit_ignores_it(caplog):
    cfg = parse_config(_models({"model": "a", "parameters": {"weight": 1.0, "normalize": False}}))
    assert "method-level parameter" in caplog.text
    assert cfg.models[0].parameters["normalize"] is False


def test_mergekit_base_rules():
    # the base joins the inputs when not listed, so a base-using method may list only fine-tunes
    assert parse_config(_models({"model": "a", "parameters": W})).base_model == "b"
    # a base-ignoring method counts the added base as an input too (mergekit: passthrough takes one)
    with pytest.raises(MergeConfigError, match="exactly 1 model"):
        parse_config(_models({"model": "a"}, method="passthrough"))
    cfg = parse_config(_models({"model": "a"}, {"model": "c"}, method="model_stock"))
    assert isinstance(cfg, MergeConfig) and cfg.referenced_models() == ["a", "c", "b"]
