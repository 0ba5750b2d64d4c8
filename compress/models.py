"""Resolve `--model` (alias, hub id, local directory or .gguf file) and load a causal LM with its tokenizer."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
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
    """A local directory or a hub id for `name` (a .gguf file: its converted directory, made once); a one-line
    CompressError when it can be neither."""
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CompressError(f"GGUF file '{name}' does not exist")
        return str(gguf_directory(path))
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


def empty_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The causal LM that path/config.json describes, every weight on the meta device (buffers such as RoPE's are
    real), for `fill_model`. A quantization_config is dropped: the model is filled with float weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def fill_model(model, state: dict[str, torch.Tensor], where: str):
    """Assign `state` to an `empty_model`, in eval mode. A tensor whose shape or dtype differs from the model's, a
    missing or an unexpected key is refused (CompressError naming `where`); a tied head is tied."""
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise CompressError(f"{where}: {key} has shape {list(tensor.shape)}, expected {list(expected[key].shape)}")
        if key in expected and expected[key].dtype != tensor.dtype:
            raise CompressError(f"{where}: {key} has dtype {tensor.dtype}, expected {expected[key].dtype}")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CompressError(f"{where}: the tensors do not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")
    if tied:
        model.tie_weights()
    return model.eval()


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/compress`, by default `~/.cache/compress`."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "compress"


def gguf_directory(gguf: Path, directory: Path | None = None) -> Path:
    """A transformers directory (float32 safetensors + tokenizer) converted from a GGUF checkpoint on first use.

    The default place is under `cache_root()/gguf`, named after the file and a hash of its path, size and time,
    so a changed file is converted again. Says so on stderr when it converts (once per file)."""
    gguf = gguf.expanduser().resolve()
    if directory is None:
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        directory = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if not ((directory / "config.json").is_file() and any(directory.glob("*.safetensors"))):
        print(f"converting {gguf} to {directory} (once)", file=sys.stderr)
        directory.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, directory)
    return directory


def convert_gguf(gguf: Path, directory: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers (needs the `gguf` package) and save it as a plain float32
    safetensors directory, written beside it first and renamed at the end: an interrupted conversion leaves nothing
    that looks finished."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ImportError, OSError, ValueError) as exc:
        raise CompressError(f"cannot read {gguf} with transformers (pip install gguf): "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its tensors are already
    # dequantized: move them into a plain model built from the same config without the quantization entry.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
