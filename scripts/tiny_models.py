"""Tiny offline model families: a character tokenizer, small Llama/Qwen2/Mistral models, short fine-tunes.

Used by the tests and the demo to get real Hugging Face model folders in seconds; never downloads.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = [ch for ch in string.printable if ch not in "\t\r\x0b\x0c"]  # 96 characters incl. "\n" and " "


def build_char_tokenizer():
    """A character-level fast tokenizer (one token per character) that loads with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ALPHABET)


def tiny_config(
    arch: str = "llama",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int = VOCAB_SIZE,
    tied: bool = False,
    max_positions: int = 256,
):
    """A transformers config for a tiny decoder of the given family (llama, qwen2 or mistral)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def new_model(config, seed: int = 0):
    """A freshly initialized causal LM for `config`, deterministic in `seed`, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.float()


def train_steps(model, tokenizer, texts: list[str], steps: int, lr: float = 1e-3, batch: int = 16,
                seed: int = 0, max_len: int = 64, weight_decay: float = 0.0) -> float:
    """Train `model` in place for `steps` AdamW steps of next-token loss on `texts`; returns the last loss."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_value = float("nan")
    for _ in range(steps):
        chunk = [rng.choice(texts) for _ in range(batch)]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                        add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss_value = out.loss.item()
    model.eval()
    return loss_value


def save_model(model, tokenizer, path: Path) -> Path:
    """Save model (safetensors) and tokenizer as a Hugging Face folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _texts(kind: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
        if kind == "add":
            out.append(f"{a}+{b}={a + b}")
        elif kind == "reverse":
            out.append(f"rev {word} = {word[::-1]}")
        elif kind == "upper":
            out.append(f"up {word} = {word.upper()}")
        else:  # mixed
            out.append(rng.choice([f"{a}+{b}={a + b}", f"rev {word} = {word[::-1]}", f"the {word} is {a}"]))
    return out


def build_test_family(root: Path) -> dict[str, Path]:
    """Build the test model zoo under `root`; returns name -> folder.

    - base, ft_add, ft_reverse, ft_upper: Llama (hidden 64, 4 layers, GQA), fine-tunes of base
    - tied_base, tied_ft: a tied-embedding Llama family
    - qwen2: a second decoder family (q/k/v biases); llama_6l: a different layer count
    """
    root = Path(root)
    tok = build_char_tokenizer()
    paths: dict[str, Path] = {}

    base = new_model(tiny_config("llama"), seed=0)
    train_steps(base, tok, _texts("mixed", 256, 0), steps=20, lr=3e-3, seed=0)
    paths["base"] = save_model(base, tok, root / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, kind in enumerate(["add", "reverse", "upper"]):
        base.load_state_dict(base_state)
        train_steps(base, tok, _texts(kind, 256, i + 1), steps=12, lr=2e-3, seed=i + 1)
        paths[f"ft_{kind}"] = save_model(base, tok, root / f"ft_{kind}")

    tied = new_model(tiny_config("llama", tied=True), seed=1)
    paths["tied_base"] = save_model(tied, tok, root / "tied_base")
    train_steps(tied, tok, _texts("add", 128, 7), steps=8, lr=2e-3, seed=7)
    paths["tied_ft"] = save_model(tied, tok, root / "tied_ft")

    paths["qwen2"] = save_model(new_model(tiny_config("qwen2"), seed=2), tok, root / "qwen2")
    paths["llama_6l"] = save_model(new_model(tiny_config("llama", layers=6), seed=3), tok, root / "llama_6l")
    return paths
