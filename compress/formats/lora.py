"""Low-rank factors as a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

PEFT stores, per adapted linear `<name>`, `base_model.model.<name>.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r), and adds `scaling * lora_B @ lora_A` to the weight, scaling = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora; alpha_pattern overrides lora_alpha per module). This tool writes lora_alpha = r, so scaling = 1 and
lora_B @ lora_A = up @ down; it reads any plain LoRA adapter back as factors with up @ down = scaling * B @ A.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import CompressError
from compress.formats.dense import dense_linear
from compress.layer import CompressedLinear
from kernels.reference import materialize

ADAPTER = "adapter"  # the adapter's directory beside a checkpoint's weights
CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"
PREFIX = "base_model.model."
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values (above 1)


def save_lora_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_model: str, directory: Path) -> None:
    """factors: {module name: (up (out, r), down (r, in))}, all of one rank; writes adapter_config.json and
    adapter_model.safetensors (fp16) into `directory`."""
    ranks = {down.shape[0] for _, down in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"a LoRA adapter here holds one rank, got {sorted(ranks)}")
    rank = ranks.pop()
    tensors = {}
    for name, (up, down) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = down.to(torch.float16).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = up.to(torch.float16).contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in factors}), "init_lora_weights": True,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
              "use_dora": False}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / TENSORS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_lora_adapter(directory: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (up (out, r), down (r, in)) float32} with up @ down = scaling * lora_B @ lora_A.

    Refuses (CompressError) what is not a plain LoRA: DoRA, fan_in_fan_out, bias training, modules_to_save."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG).read_text())
        tensors = load_file(directory / TENSORS)
    except FileNotFoundError as exc:
        raise CompressError(f"{directory} is not a LoRA adapter: {Path(exc.filename).name} is missing") from None
    except Exception as exc:  # json and safetensors raise their own error types for corrupt files
        raise CompressError(f"cannot read the LoRA adapter in {directory}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CompressError(f"{directory / CONFIG} does not describe a LoRA adapter (peft_type LORA)")
    unsupported = [key for key in ("use_dora", "fan_in_fan_out", "modules_to_save") if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise CompressError(f"{directory / CONFIG}: {', '.join(unsupported)} is not supported (plain LoRA only)")
    factors = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        up = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if up is None or down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise CompressError(f"{directory / TENSORS}: {name} needs lora_A (r, in) and lora_B (out, r)")
        rank = down.shape[0]
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[name] = (up.float() * scaling, down.float())
    if not factors:
        raise CompressError(f"{directory / TENSORS} holds no lora_A / lora_B weights")
    return factors


def layer_factors(layer: CompressedLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up (out, r), down (r, in)) of a compressed layer in float32, dequantized where quantized; None without."""
    if layer.up is None:
        return None
    return materialize(layer.up.operand(), torch.float32), materialize(layer.down.operand(), torch.float32)


def add_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """W + up @ down in each named linear (in place; returns the model): each becomes an nn.Linear holding the sum,
    formed in float32 and cast to the layer's dtype (a CompressedLinear's: the model's parameters' dtype)."""
    for name, (up, down) in factors.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"the adapter adapts {name}, which the model does not have") from None
        if isinstance(layer, CompressedLinear):
            weight, dtype = layer.weight_approx(), next(model.parameters()).dtype
        elif isinstance(layer, nn.Linear):
            weight, dtype = layer.weight.detach().float(), layer.weight.dtype
        else:
            raise CompressError(f"the adapter adapts {name}, a {type(layer).__name__}, not a linear layer")
        if weight.shape != (up.shape[0], down.shape[1]):
            raise CompressError(f"the adapter's {name} is ({up.shape[0]}, {down.shape[1]}), the layer "
                                f"{tuple(weight.shape)}")
        model.set_submodule(name, dense_linear((weight + up @ down).to(dtype), layer.bias))
    return model


def pattern_value(patterns: dict, name: str, default):
    """The value of the first pattern that matches the end of module `name` (PEFT's rank_pattern / alpha_pattern)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            return value
    return default


def lora_rank(ranks: set[int]) -> int:
    """The smallest rank vLLM accepts that holds every layer's factors (the largest rank itself above 512)."""
    largest = max(ranks)
    return next((r for r in VLLM_LORA_RANKS if r >= largest), largest)


def pad_factors(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up (out, r), down (r, in) zero-padded to `rank`: up @ down is unchanged."""
    extra = rank - down.shape[0]
    return (torch.cat([up, up.new_zeros(up.shape[0], extra)], 1),
            torch.cat([down, down.new_zeros(extra, down.shape[1])]))
