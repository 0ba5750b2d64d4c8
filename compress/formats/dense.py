"""A plain transformers checkpoint: every compressed layer merged back to W = base + up @ down, saved with
save_pretrained (safetensors shards, with an index when there are several)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compress.layer import CompressedLinear

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(source: Path, name: str | None = None) -> torch.dtype:
    """The dtype dense tensors are written in: `name` (a key of DTYPES), else the checkpoint's own, else fp16."""
    if name:
        return DTYPES[name]
    try:
        stored = json.loads((source / "config.json").read_text()).get("dtype")
    except (OSError, ValueError):
        stored = None
    return DTYPES.get(stored, torch.float16)


def merge_layers(model: nn.Module) -> nn.Module:
    """Replace every CompressedLinear by an nn.Linear holding W = base + up @ down (in place; returns the model)."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]:
        model.set_submodule(name, dense_linear(layer.weight_approx(), layer.bias))
    return model


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear in eval mode holding weight (out, in) and a copy of bias, both in weight's dtype."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype).clone())
    return linear.eval()


def write_dense(model: nn.Module, tokenizer, directory: Path, dtype: torch.dtype, max_shard_size: str) -> dict:
    """save_pretrained in `dtype`: safetensors shards of at most max_shard_size, with an index when there are
    several."""
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"dtype": str(dtype).removeprefix("torch."), "shards": len(list(directory.glob("*.safetensors")))}
