"""Every architecture merges as mergekit 0.1.5 merges it: the architecture table against mergekit's definitions, and
linear / TIES with gradients / SLERP with gradients on tiny random models of 12 architectures, tensor by tensor,
through the streaming writer (`mergesearch merge`) and the in-memory engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from arch_zoo import ARCHS, MORE_ARCHS, build_family, build_more, parity_configs
from mergekit_oracle import max_abs_diff, read_folder, run_mergekit

from merge_core.architectures import ARCHITECTURES, find_architecture
from merge_core.config import parse_config
from merge_core.errors import MergeConfigError

TOL = 1e-5


@pytest.fixture(scope="session")
def arch_zoo(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("arch_zoo")
    return {arch: build_family(arch, root / arch) for arch in ARCHS}


def ours(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from merge_core.writer import merge_to_folder

    merge_to_folder(parse_config(config), out, device="cpu", copy_tokenizer=False, force=True)
    return read_folder(out)


def engine_state(config: dict) -> dict[str, torch.Tensor]:
    from merge_core.engine import MergeEngine

    with torch.no_grad():
        return {k: v.clone() for k, v in MergeEngine(parse_config(config), "cpu").materialize().state_dict().items()}


# ---- the table -------------------------------------------------------------------------------------

def _mergekit_causal_architectures():
    from mergekit.architecture.json_definitions import JSON_ARCHITECTURES

    for arch in JSON_ARCHITECTURES:
        if len(arch.modules) != 1:
            continue                      # multimodal / encoder-decoder definitions
        name = arch.architectures[0]
        if name.startswith("_") or not (name.endswith(("ForCausalLM", "LMHeadModel")) or name == "ChatGLMModel"):
            continue                      # internal parts and classifier / encoder heads
        key = next(iter(arch.modules.values())).architecture.num_layers_config_key()
        yield name, arch.expected_model_type, key
    yield "Glm4MoeForCausalLM", "glm4_moe", "num_hidden_layers"      # defined in code, not JSON
    yield "AfmoeForCausalLM", "afmoe", "num_hidden_layers"


def _deliberate(model_type: str, name: str, theirs, ours_) -> bool:
    """Where our table knowingly differs from mergekit's: only to merge checkpoints mergekit cannot read."""
    if model_type == "mixtral" and name.endswith("mlp.gate.weight"):
        return ours_[1] == (name.replace("mlp.gate", "block_sparse_moe.gate"),)   # transformers' own renaming
    if model_type == "gpt_neox" and name.endswith(("attention.bias", "masked_bias", "inv_freq")):
        return ours_[0] is True              # buffers transformers v5 no longer saves: optional
    if model_type == "cohere" and name.endswith(("q_norm.weight", "k_norm.weight")):
        return ours_[0] is True              # present only with use_qk_norm
    if model_type == "falcon":               # Falcon-7B layouts: any layer norm optional, a tied head
        return ours_[0] is True and (".ln_" in name or "layernorm" in name or name == "lm_head.weight")
    return False


def test_table_matches_mergekit_architecture_definitions():
    from mergekit.architecture import arch_info_for_config
    from transformers import PretrainedConfig

    checked = set()
    for name, model_type, key in _mergekit_causal_architectures():
        values = {"architectures": [name], "model_type": model_type, key: 3, "num_experts": 2,
                  "n_routed_experts": 2, "first_k_dense_replace": 1}
        hf = PretrainedConfig()
        for k, v in values.items():
            setattr(hf, k, v)
        info = arch_info_for_config(hf)
        theirs = {w.name: (w.optional, tuple(w.aliases or ()), tuple(w.tied_names or ())) for w in info.all_weights(hf)}
        arch = find_architecture(values)
        assert arch is not None, f"{name} ({model_type}) missing from the table"
        checked.add(arch.model_type)
        mine = {w.name: (w.optional, w.aliases, w.tied) for w in arch.all_weights(values)}
        for tensor in sorted(set(theirs) | set(mine)):
            if theirs.get(tensor) != mine.get(tensor):
                assert mine.get(tensor) and _deliberate(model_type, tensor, theirs.get(tensor), mine[tensor]), \
                    f"{name}: {tensor}: mergekit {theirs.get(tensor)}, ours {mine.get(tensor)}"
    assert checked == {a.model_type for a in ARCHITECTURES}


def test_unknown_architecture_is_refused_in_one_line(arch_zoo, tmp_path):
    odd = {}
    for name in ("base", "ft1", "ft2"):
        odd[name] = tmp_path / name
        shutil.copytree(arch_zoo["llama"][name], odd[name])
        cfg = json.loads((odd[name] / "config.json").read_text())
        (odd[name] / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"],
                                                           "model_type": "foo"}))
    with pytest.raises(MergeConfigError) as err:
        ours(parity_configs(odd)["ties"], tmp_path / "out")
    text = str(err.value)
    assert "\n" not in text and err.value.where == f"model {odd['base']}"
    assert "FooForCausalLM" in text and "'foo'" in text and "LlamaForCausalLM" in text and "GPT2LMHeadModel" in text


# ---- parity with mergekit ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_mergekit(arch_zoo, tmp_path, arch, method):
    config = parity_configs(arch_zoo[arch])[method]
    theirs = run_mergekit(config, tmp_path / "mergekit")
    mine = ours(config, tmp_path / "ours")
    assert set(mine) == set(theirs)
    assert all(mine[n].shape == theirs[n].shape for n in theirs)
    diff, where = max_abs_diff(mine, theirs)
    assert diff <= TOL, f"{arch} {method}: max |diff| {diff:.2e} at {where}"
    live = engine_state(config)               # the in-memory trial path writes the same values
    assert max_abs_diff({n: live[n] for n in mine}, mine)[0] <= 1e-6


@pytest.mark.parametrize("model_type", sorted(MORE_ARCHS))
def test_more_architectures_merge_as_mergekit_does(tmp_path, model_type):
    """The other table entries transformers builds natively: equal to mergekit where mergekit merges them."""
    config = parity_configs(build_more(model_type, tmp_path / "m"))["ties"]
    mine = ours(config, tmp_path / "ours")
    live = engine_state(config)
    assert max_abs_diff({n: live[n] for n in mine}, mine)[0] <= 1e-6
    if model_type == "cohere":                 # without use_qk_norm: mergekit's table requires q_norm / k_norm
        with pytest.raises(Exception, match="q_norm"):
            run_mergekit(config, tmp_path / "mergekit")
        return
    theirs = run_mergekit(config, tmp_path / "mergekit")
    assert set(mine) == set(theirs) and max_abs_diff(mine, theirs)[0] <= TOL


def test_moe_experts_are_written_fused_as_mergekit_writes_them(arch_zoo, tmp_path):
    config = parity_configs(arch_zoo["mixtral"])["ties"]
    mine = ours(config, tmp_path / "ours")
    assert mine["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 128, 32)
    assert mine["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 64)
    assert not any("block_sparse_moe" in n or ".experts.0." in n for n in mine)


def test_fused_and_per_expert_checkpoints_merge_alike(arch_zoo, tmp_path):
    """A checkpoint that already holds fused experts (as transformers v5 holds them) reads the same."""
    from safetensors.torch import save_file

    from merge_core.sources import ModelSource

    family = arch_zoo["qwen3_moe"]
    fused = tmp_path / "fused"
    fused.mkdir()
    source = ModelSource(family["ft2"])
    save_file({n: source.read(n).contiguous() for n in source.tensor_names}, str(fused / "model.safetensors"))
    shutil.copy(family["ft2"] / "config.json", fused / "config.json")
    assert "model.layers.1.mlp.experts.gate_up_proj" in ModelSource(fused).stored_meta
    a = ours(parity_configs(family)["ties"], tmp_path / "a")
    b = ours(parity_configs({**family, "ft2": fused})["ties"], tmp_path / "b")
    assert max_abs_diff(a, b)[0] == 0.0


def test_gpt2_checkpoint_without_the_transformer_prefix(arch_zoo, tmp_path):
    """Original GPT-2 checkpoints name tensors `h.0.attn...`, `wte.weight`: read as aliases, written canonical."""
    from safetensors.torch import load_file, save_file

    family = dict(arch_zoo["gpt2"])
    bare = tmp_path / "bare"
    bare.mkdir()
    tensors = load_file(str(family["ft2"] / "model.safetensors"))
    save_file({n.removeprefix("transformer."): t for n, t in tensors.items()}, str(bare / "model.safetensors"))
    shutil.copy(family["ft2"] / "config.json", bare / "config.json")
    config = parity_configs({**family, "ft2": bare})["ties"]
    mine = ours(config, tmp_path / "ours")
    assert max_abs_diff(mine, run_mergekit(config, tmp_path / "mergekit"))[0] <= TOL
    assert max_abs_diff(mine, ours(parity_configs(family)["ties"], tmp_path / "prefixed"))[0] == 0.0


def test_gpt2_slices_write_n_layer(arch_zoo, tmp_path):
    family = arch_zoo["gpt2"]
    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(family["ft1"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(family["ft2"]), "layer_range": [1, 3]}]}]}
    theirs = run_mergekit(config, tmp_path / "mergekit")
    mine = ours(config, tmp_path / "ours")
    assert set(mine) == set(theirs) and max_abs_diff(mine, theirs)[0] == 0.0
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["n_layer"] == 4 == json.loads((tmp_path / "mergekit" / "config.json").read_text())["n_layer"]
    assert "num_hidden_layers" not in written


def test_falcon_7b_layout_merges_here_though_mergekit_refuses_it(tmp_path):
    family = build_family("falcon7b", tmp_path / "f7")
    config = parity_configs(family)["ties"]
    with pytest.raises(Exception, match="ln_attn|lm_head"):
        run_mergekit(config, tmp_path / "mergekit")
    mine = ours(config, tmp_path / "ours")
    assert "transformer.h.2.input_layernorm.weight" in mine and "lm_head.weight" not in mine
    live = engine_state(config)
    assert max_abs_diff({n: live[n] for n in mine}, mine)[0] <= 1e-6


def test_cli_merge_equals_mergekit_on_gpt2(arch_zoo, tmp_path, cli):
    import yaml

    config = parity_configs(arch_zoo["gpt2"])["slerp"]
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    proc = cli("merge", tmp_path / "merge.yaml", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert max_abs_diff(read_folder(tmp_path / "out"), run_mergekit(config, tmp_path / "mergekit"))[0] <= TOL
