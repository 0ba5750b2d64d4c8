"""Resolve `--model` (alias, hub id or local directory) and load a causal LM with its tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

from compress.errors import CompressError

DEMO_DIR = Path(__file__).resolve().parent / "demo"
ALIASES = {
    "demo": str(DEMO_DIR),
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
}


def resolve_model(name: str) -> str:
    """A local directory or a hub id for `name`; a one-line CompressError when it can be neither."""
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_like_path:
        if "/" not in name and not path.exists():
            raise CompressError(f"unknown model '{name}': not an alias ({', '.join(ALIASES)}), "
                                "not a hub id (org/name), not a directory")
        raise CompressError(f"model directory '{name}' does not exist")
    return name  # a hub id


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, resolved name) for an alias, hub id or local directory, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(name)
    try:
        stored_dtype = AutoConfig.from_pretrained(resolved).dtype
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    except OSError as exc:
        if Path(resolved).is_dir():
            raise CompressError(f"cannot load a model from {resolved}: {str(exc).splitlines()[0]}") from None
        raise CompressError(f"cannot load '{resolved}' from the hugging face hub (offline, not cached, gated or "
                            "misspelled): download it elsewhere and pass its local directory "
                            "with --model DIR") from None
    # The config keeps the checkpoint's own dtype: outputs store the untouched tensors in it, not in `dtype`.
    model.config.dtype = stored_dtype or dtype
    return model.eval(), tokenizer, resolved
