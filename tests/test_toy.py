"""The tiny model zoo is made of real, loadable Hugging Face folders with real fine-tune deltas."""

import torch
from safetensors.torch import load_file


def test_zoo_models_load_offline(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["base"])
    ids = tok("12+3=15", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and tok.decode(ids) == "12+3=15"
    for name in ["base", "ft_add", "qwen2", "llama_6l", "tied_ft"]:
        model = AutoModelForCausalLM.from_pretrained(zoo[name])
        assert model.config.vocab_size == len(tok)
    assert AutoModelForCausalLM.from_pretrained(zoo["llama_6l"]).config.num_hidden_layers == 6
    assert AutoModelForCausalLM.from_pretrained(zoo["qwen2"]).config.model_type == "qwen2"


def test_finetunes_differ_from_base_everywhere_that_trains(zoo):
    base = load_file(zoo["base"] / "model.safetensors")
    for name in ["ft_add", "ft_reverse", "ft_upper"]:
        ft = load_file(zoo[name] / "model.safetensors")
        assert ft.keys() == base.keys()
        changed = [k for k in base if not torch.equal(base[k], ft[k])]
        assert len(changed) > 0.9 * len(base), name


def test_tied_model_has_no_lm_head_tensor(zoo):
    tensors = load_file(zoo["tied_ft"] / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
