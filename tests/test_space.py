"""The search space: study YAML validation, genes, genome -> mergekit config that mergekit reproduces."""

from __future__ import annotations

import pytest
import yaml
from mergekit_oracle import max_abs_diff, read_folder, run_mergekit, run_ours
from studyfiles import write_study

from merge_core.config import config_to_dict, dump_config
from search import StudyError
from search.space import SearchSpace
from search.study import load_study


def test_gene_layout_per_model_per_group_per_layer(zoo, tmp_path):
    space = SearchSpace(load_study(write_study(tmp_path, zoo, per_filter=["self_attn", "mlp"])))
    assert space.num_layers == 4 and space.anchors == 4
    # 2 params x 2 models (base excluded for ties) x 3 groups (self_attn, mlp, rest) x 4 layers
    assert len(space.genes) == 48
    assert "weight.m0.self_attn.3" in space.names and "density.m1.rest.0" in space.names


def test_global_and_anchor_granularity(zoo, tmp_path):
    assert len(SearchSpace(load_study(write_study(tmp_path / "g", zoo, granularity="global"))).genes) == 4
    space = SearchSpace(load_study(write_study(tmp_path / "a", zoo, granularity="anchors:2")))
    genome = {n: 0.5 for n in space.names}
    cfg = config_to_dict(space.config(genome))
    assert cfg["models"][0]["parameters"]["weight"] == [0.5, 0.5]


def test_per_layer_values_land_on_their_layers(zoo, tmp_path):
    from merge_core.methods import get_method
    from merge_core.plan import plan_merge, resolve_tensor_params
    from merge_core.sources import ModelSource

    space = SearchSpace(load_study(write_study(tmp_path, zoo, per_filter=["mlp"])))
    genome = {g.name: round(0.1 * g.anchor + (0.05 if g.group == "mlp" else 0.0), 4) + 0.01 * g.model
              for g in space.genes}
    cfg = space.config(space.clip(genome))
    refs = cfg.referenced_models()
    sources = {r: ModelSource(cfg.resolve_model(r), r) for r in refs}
    plan = plan_merge(cfg, {r: s.tensor_names for r, s in sources.items()}, {r: 4 for r in refs})
    method = get_method("ties")
    for task in plan:
        if ".layers.2.mlp.down_proj" in task.out_name:
            _, per_model = resolve_tensor_params(cfg, method, task)
            weights = [p.get("weight") for p in per_model if p]
            assert weights == pytest.approx([0.25, 0.26])
        if ".layers.1.self_attn.q_proj" in task.out_name:
            _, per_model = resolve_tensor_params(cfg, method, task)
            assert [p.get("weight") for p in per_model if p] == pytest.approx([0.1, 0.11])


@pytest.mark.parametrize("method,params,per_filter", [
    ("ties", {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, ["self_attn", "mlp"]),
    ("task_arithmetic", {"weight": [0.0, 1.5]}, None),
    ("slerp", {"t": [0.0, 1.0]}, ["self_attn"]),
    ("linear", {"weight": [0.1, 1.0]}, None),
])
def test_genome_config_reproduces_in_mergekit(method, params, per_filter, zoo, tmp_path):
    space = SearchSpace(load_study(write_study(tmp_path, zoo, method=method, params=params, per_filter=per_filter)))
    import random

    rng = random.Random(0)
    genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
    raw = yaml.safe_load(dump_config(space.config(genome)))   # exactly what a file would hold
    theirs = run_mergekit(raw, tmp_path / "mk")
    ours = run_ours(raw)
    assert max_abs_diff(ours, theirs)[0] <= 1e-5


def test_parent_seed_reproduces_the_parent(zoo, tmp_path):
    space = SearchSpace(load_study(write_study(tmp_path, zoo)))
    seeds = dict(space.seed_genomes())
    assert {"uniform", "defaults"} <= set(seeds)
    parent = seeds["parent ft_add"]
    merged = run_ours(config_to_dict(space.config(parent)))
    diff, where = max_abs_diff(merged, read_folder(zoo["ft_add"]))
    assert diff <= 1e-6, where


@pytest.mark.parametrize("change,field", [
    ({"space": {"params": {"bogus": [0, 1]}}}, "space.params.bogus"),
    ({"space": {"params": {"density": [0.5, 1.5]}}}, "space.params.density"),
    ({"space": {"params": {"weight": [1, 0]}}}, "space.params.weight"),
    ({"space": {"params": {"weight": [0, 1]}, "granularity": "rows"}}, "space.granularity"),
    ({"sampler": {"name": "annealing"}}, "sampler"),
    ({"pruner": {"name": "patience"}}, "pruner"),
    ({"budget": {"trials": 0}}, "budget.trials"),
    ({"budget": {"timeout": "eight hours"}}, "budget.timeout"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_study_fields_are_named(change, field, zoo, tmp_path):
    path = write_study(tmp_path, zoo, extra=change)
    with pytest.raises(StudyError, match=field.replace(".", r"\.")):
        SearchSpace(load_study(path))


def test_soup_seed_puts_equal_weight_on_the_soup_ingredients(zoo, tmp_path):
    soup = tmp_path / "soup_config.yaml"
    soup.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                    "models": [{"model": str(zoo["ft_reverse"]), "parameters": {"weight": 1.0}}]}))
    path = write_study(tmp_path, zoo, method="linear", params={"weight": [0.0, 1.0]}, granularity="global",
                       extra={"seed_trials": ["soup"], "soup_config": "soup_config.yaml"})
    seeds = dict(SearchSpace(load_study(path)).seed_genomes())
    assert seeds["greedy soup"] == {"weight.m0": 0.0, "weight.m1": 1.0}
