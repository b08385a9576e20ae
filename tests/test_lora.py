"""LoRA adapters as merge sources: `BASE+ADAPTER` and adapter folders merge as mergekit 0.1.5 merges them (it runs
PEFT's merge_and_unload), through the writer and the engine; the engine keeps adapters low-rank where it can."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from arch_zoo import build_family, tiny_config
from mergekit_oracle import max_abs_diff, read_folder

from merge_core.config import parse_config
from merge_core.errors import MergeConfigError

TOL = 1e-5


def make_adapter(base: Path, out: Path, seed: int, **lora) -> Path:
    """A PEFT LoRA adapter on `base` with random (non-zero) A and B, saved to `out`."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_zoo")
    llama = build_family("llama", root / "llama")
    gpt2 = build_family("gpt2", root / "gpt2")
    zoo = {"base": llama["base"], "ft": llama["ft1"], "gpt2": gpt2["base"], "gpt2_ft": gpt2["ft1"]}
    zoo["rich"] = make_adapter(zoo["base"], root / "rich", 1, r=4, lora_alpha=8, use_rslora=True,
                               target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                               modules_to_save=["lm_head"], rank_pattern={"down_proj": 2},
                               alpha_pattern={"v_proj": 3})
    zoo["plain"] = make_adapter(zoo["base"], root / "plain", 2, r=2, lora_alpha=4,
                                target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])
    zoo["plain2"] = make_adapter(zoo["base"], root / "plain2", 3, r=2, lora_alpha=2,
                                 target_modules=["q_proj", "v_proj", "gate_proj"])
    zoo["gpt2_lora"] = make_adapter(zoo["gpt2"], root / "gpt2_lora", 4, r=2, lora_alpha=4, fan_in_fan_out=True,
                                    target_modules=["c_attn", "c_proj", "c_fc"])
    return zoo


@pytest.fixture
def mergekit(tmp_path):
    """mergekit's merge of a config with LoRA references (its adapter cache in a fresh folder)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def run(config: dict, name: str = "mergekit") -> dict[str, torch.Tensor]:
        out = tmp_path / name
        options = MergeOptions(random_seed=0, quiet=True, copy_tokenizer=False, write_model_card=False,
                               lora_merge_cache=str(tmp_path / "lora_cache"))
        run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
        return read_folder(out)

    return run


def ours(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from merge_core.writer import merge_to_folder

    merge_to_folder(parse_config(config), out, device="cpu", copy_tokenizer=False, force=True)
    return read_folder(out)


def engine(config: dict):
    from merge_core.engine import MergeEngine

    return MergeEngine(parse_config(config), "cpu")


def live_state(eng) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in eng.materialize().state_dict().items()}


def configs(z: dict) -> dict[str, dict]:
    rich, plain = f"{z['base']}+{z['rich']}", f"{z['base']}+{z['plain']}"
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": rich, "parameters": {"weight": 0.5}}, {"model": str(z["ft"]), "parameters": {"weight": 0.3}},
            {"model": plain, "parameters": {"weight": 0.2}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(z["base"]), "dtype": "float32",
                            "models": [{"model": rich, "parameters": {"weight": [0.4, 1.0, 0.7]}},
                                       {"model": plain, "parameters": {"weight": 0.8}},
                                       {"model": str(z["ft"]), "parameters": {"weight": 0.5}}]},
        "ties": {"merge_method": "ties", "base_model": str(z["base"]), "dtype": "float32",
                 "models": [{"model": rich, "parameters": {"weight": [0.2, 0.8, 0.5], "density": 0.5}},
                            {"model": plain, "parameters": {"weight": 0.6, "density": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": rich, "dtype": "float32",
                  "models": [{"model": rich}, {"model": str(z["ft"])}], "parameters": {"t": [0.1, 0.5, 0.9]}},
    }


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp"])
def test_lora_merge_equals_mergekit(lora_zoo, mergekit, tmp_path, method):
    config = configs(lora_zoo)[method]
    theirs = mergekit(config)
    mine = ours(config, tmp_path / "ours")
    assert set(mine) == set(theirs)
    diff, where = max_abs_diff(mine, theirs)
    assert diff <= TOL, f"{method}: {diff:.2e} at {where}"
    live = live_state(engine(config))
    assert max_abs_diff({n: live[n] for n in mine}, mine)[0] <= 1e-6


def test_adapter_folder_as_a_model_is_base_plus_adapter(lora_zoo, tmp_path):
    config = configs(lora_zoo)["task_arithmetic"]
    alone = json.loads(json.dumps(config).replace(f"{lora_zoo['base']}+{lora_zoo['rich']}", str(lora_zoo["rich"])))
    assert str(lora_zoo["rich"]) in [m["model"] for m in alone["models"]]
    assert max_abs_diff(ours(alone, tmp_path / "alone"), ours(config, tmp_path / "plus"))[0] == 0.0


def test_engine_keeps_adapters_low_rank_and_the_base_once(lora_zoo, tmp_path):
    from merge_core.lora import LowRankInputs
    from merge_core.sources import ModelSource

    z = lora_zoo
    config = {"merge_method": "task_arithmetic", "base_model": str(z["base"]), "dtype": "float32",
              "models": [{"model": f"{z['base']}+{z[a]}", "parameters": {"weight": w}}
                         for a, w in (("rich", 0.5), ("plain", 0.7), ("plain2", [0.3, 0.9]))]}
    eng = engine(config)
    adapted = [i for i in eng._inputs if isinstance(i, LowRankInputs)]
    assert {i.name for i in adapted} >= {"model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"}
    base_bytes = ModelSource(z["base"]).nbytes()
    assert eng.resident_bytes() < 1.6 * base_bytes     # one dense copy plus factors (rank 2-4 of hidden 32), not 4
    live = live_state(eng)
    mine = ours(config, tmp_path / "ours")
    assert max_abs_diff({n: live[n] for n in mine}, mine)[0] <= 1e-6
    config["models"][0]["parameters"]["weight"] = 0.1     # a second trial, same engine
    live = {k: v.detach().clone() for k, v in eng.materialize(parse_config(config)).state_dict().items()}
    mine = ours(config, tmp_path / "again")
    assert max_abs_diff({n: live[n] for n in mine}, mine)[0] <= 1e-6


def test_gpt2_adapter_on_conv1d_layers(lora_zoo, mergekit, tmp_path):
    z = lora_zoo
    config = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{z['gpt2']}+{z['gpt2_lora']}", "parameters": {"weight": [0.2, 0.9]}},
        {"model": str(z["gpt2_ft"]), "parameters": {"weight": 0.5}}]}
    mine = ours(config, tmp_path / "ours")
    assert max_abs_diff(mine, mergekit(config))[0] <= TOL
    live = live_state(engine(config))
    assert max_abs_diff({n: live[n] for n in mine}, mine)[0] <= 1e-6


def test_bfloat16_base_and_lora_bias(tmp_path, mergekit):
    """A bfloat16 base (the adapter's delta is computed in float32 and rounded on the add, as PEFT does) and an
    adapter with lora_bias on Qwen2's biased projections. (Merged in float32: with a bfloat16 compute dtype our
    task arithmetic rounds differently from mergekit's by one bfloat16 step, with or without adapters.)"""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    adapter = make_adapter(tmp_path / "base", tmp_path / "lora", 5, r=2, lora_alpha=4, lora_bias=True,
                           target_modules=["q_proj", "v_proj"])
    config = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "out_dtype": "bfloat16",
              "models": [{"model": f"{tmp_path / 'base'}+{adapter}", "parameters": {"weight": 0.6}}]}
    theirs = mergekit(config)
    mine = ours(config, tmp_path / "ours")
    assert all(t.dtype == torch.bfloat16 for t in mine.values())
    assert max_abs_diff(mine, theirs)[0] == 0.0
    assert not torch.equal(mine["model.layers.0.self_attn.q_proj.bias"],
                           read_folder(tmp_path / "base")["model.layers.0.self_attn.q_proj.bias"])


def test_unsupported_or_mismatched_adapters_are_one_line(lora_zoo, tmp_path):
    z = lora_zoo
    dora = tmp_path / "dora"
    shutil.copytree(z["plain"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    cases = [(f"{z['base']}+{dora}", "use_dora are not supported"),
             (f"{z['base']}+{z['gpt2_lora']}", "does not have"),
             (f"{z['base']}+{tmp_path / 'missing'}", "adapter folder not found")]
    for ref, message in cases:
        config = {"merge_method": "task_arithmetic", "base_model": str(z["base"]),
                  "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
        with pytest.raises(MergeConfigError) as err:
            ours(config, tmp_path / "out")
        assert message in str(err.value) and "\n" not in str(err.value) and err.value.where == f"model {ref}"


@pytest.mark.slow
def test_a_study_searches_over_adapters(zoo, tmp_path, cli):
    """The search loop over LoRA adapters of the tiny demo family, as over full fine-tunes."""
    import optuna
    import yaml
    from studyfiles import write_study

    from search.study import load_study

    a = make_adapter(zoo["base"], tmp_path / "lora_a", 7, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    b = make_adapter(zoo["base"], tmp_path / "lora_b", 8, r=2, lora_alpha=4, target_modules=["up_proj", "o_proj"])
    path = write_study(tmp_path / "study", zoo, method="task_arithmetic", trials=4, params={"weight": [0.0, 1.0]})
    study = yaml.safe_load(path.read_text())
    study["merge"]["models"] = [{"model": f"{zoo['base']}+{a}"}, {"model": str(b)}]
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    proc = cli("search", path, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    cfg = load_study(path)
    trials = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url()).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    best = yaml.safe_load((cfg.output_dir / "best_config.yaml").read_text())
    assert best["models"][0]["model"] == f"{zoo['base']}+{a}"
