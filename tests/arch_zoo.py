"""Test helpers: tiny random models of the architectures `mergesearch merge` is checked on, built with transformers
(from_config + save_pretrained, so MoE checkpoints hold per-expert tensors as transformers writes them), plus two
"fine-tunes" of each (the base plus small noise). Never downloads.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 101
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "stablelm", "gpt2", "falcon", "mixtral",
         "qwen3_moe"]


def tiny_config(arch: str, layers: int = 3):
    """A transformers config of `arch` with hidden size 32 and `layers` layers."""
    import transformers as T

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **ids)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1,
                            eos_token_id=2)
    if arch == "falcon":       # the Falcon-40B layout (ln_attn / ln_mlp, untied head): the one mergekit knows
        return T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                              num_kv_heads=2, new_decoder_architecture=True, tie_word_embeddings=False, **ids)
    if arch == "falcon7b":     # the Falcon-7B layout (one input_layernorm, tied head): mergekit refuses it
        return T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                              **ids)
    extra = {
        "qwen3": dict(head_dim=8), "gemma2": dict(head_dim=8), "gemma3": dict(head_dim=8),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    }.get(arch, {})
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config,
           "gemma2": T.Gemma2Config, "gemma3": T.Gemma3TextConfig, "phi3": T.Phi3Config, "stablelm": T.StableLmConfig,
           "mixtral": T.MixtralConfig, "qwen3_moe": T.Qwen3MoeConfig}[arch]
    return cls(**common, **extra)


def build_family(arch: str, folder: Path, seed: int = 0, layers: int = 3) -> dict[str, Path]:
    """base, ft1, ft2 of `arch` under `folder` (ft_k = base + N(0, 0.02) noise, seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers)).float().eval()
    return save_family(model, folder, seed)


def save_family(model, folder: Path, seed: int) -> dict[str, Path]:
    """Save `model` as base/ and two random fine-tunes of it (+N(0, 0.02) on every parameter) as ft1/, ft2/."""
    import torch

    out = {"base": folder / "base"}
    model.save_pretrained(out["base"])
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in (1, 2):
        gen = torch.Generator().manual_seed(seed * 10 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(original[name] + 0.02 * torch.randn(p.shape, generator=gen))
        out[f"ft{k}"] = folder / f"ft{k}"
        model.save_pretrained(out[f"ft{k}"])
    return out


def parity_configs(family: dict[str, Path], layers: int = 3) -> dict[str, dict]:
    """linear (constant weights), TIES (a weight gradient per model, density 0.5), SLERP (a t gradient)."""
    base, ft1, ft2 = (str(family[k]) for k in ("base", "ft1", "ft2"))
    grad = [round(0.2 + 0.6 * i / max(layers - 1, 1), 3) for i in range(layers)]
    return {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": ft1, "parameters": {"weight": 0.3}}, {"model": ft2, "parameters": {"weight": 0.7}}]},
        "ties": {"merge_method": "ties", "base_model": base, "dtype": "float32",
                 "models": [{"model": ft1, "parameters": {"weight": [0.2, 0.8, 0.5], "density": 0.5}},
                            {"model": ft2, "parameters": {"weight": grad, "density": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": ft1, "dtype": "float32",
                  "models": [{"model": ft1}, {"model": ft2}], "parameters": {"t": [0.0, 0.3, 0.9]}},
    }


# More architectures transformers builds without remote code, for a second parity test: model_type -> config kwargs.
_DECODER = dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MORE_ARCHS = {
    "gemma": _DECODER, "olmo2": _DECODER, "cohere2": _DECODER, "granite": _DECODER, "starcoder2": _DECODER,
    "arcee": _DECODER, "apertus": _DECODER, "lfm2": _DECODER, "glm4": _DECODER,
    "cohere": dict(_DECODER, use_qk_norm=False),          # mergekit requires q_norm/k_norm: it refuses this one
    "glm4_moe": dict(_DECODER, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     first_k_dense_replace=1),
    "phi": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
                pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_bigcode": dict(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "mamba": dict(hidden_size=32, num_hidden_layers=3, vocab_size=VOCAB, state_size=4, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
}


def build_more(model_type: str, folder: Path, seed: int = 0) -> dict[str, Path]:
    """base, ft1, ft2 of one of MORE_ARCHS (as build_family)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **MORE_ARCHS[model_type])).float()
    return save_family(model, folder, seed)
