"""Read quantized checkpoints made by other tools: the dequantized weight of every quantized linear, exactly.

GPTQ (AutoGPTQ / GPTQModel: `qweight`, `qzeros`, `scales`, `g_idx`; v1 `gptq` and v2 `gptq_v2` zero points,
act-order) and llm-compressor's compressed-tensors `pack-quantized` (`weight_packed`, `weight_scale`,
`weight_zero_point`, `weight_g_idx`, `weight_shape`). The layouts live in kernels.formats.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from compress.errors import CompressError
from kernels.formats import (dequantize_compressed_tensors, dequantize_gptq, encode_gptq_zeros, pack_gptq_qweight,
                             pack_gptq_qzeros)
from kernels.grid import QuantizedWeight


def quantization_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CompressError(f"cannot read {path / 'config.json'}: {exc}") from None
    if "quantization_config" not in config:
        raise CompressError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    return config["quantization_config"]


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressError(f"no .safetensors files in {path}")
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CompressError(f"cannot read {file}: {exc}") from None
    return tensors


def read_quantized_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """({module name: dequantized weight (out, in) float32}, format name) of a GPTQ or pack-quantized checkpoint."""
    path = Path(path)
    config = quantization_config(path)
    method = config.get("quant_method")
    tensors = read_tensors(path)
    try:
        if method == "gptq":
            return read_gptq(tensors, config), f"gptq ({config.get('checkpoint_format', 'gptq')})"
        if method == "compressed-tensors" and config.get("format") == "pack-quantized":
            return read_pack_quantized(tensors, config), "compressed-tensors pack-quantized"
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CompressError(f"{path}: the quantized tensors do not follow the {method} convention: {exc}") from None
    raise CompressError(f"{path}: unsupported quantization '{method}' (format {config.get('format')!r}); "
                        "supported: gptq, compressed-tensors pack-quantized")


def read_gptq(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    bits, group_size = int(config["bits"]), int(config.get("group_size", -1))
    checkpoint_format = config.get("checkpoint_format", "gptq")
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        qweight = tensors[key]
        in_features = qweight.shape[0] * 32 // bits
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is None:
            g_idx = torch.arange(in_features) // (group_size if group_size > 0 else in_features)
        weights[name] = dequantize_gptq(qweight, tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], g_idx, bits,
                                        checkpoint_format)
    return weights


def read_pack_quantized(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    groups = config["config_groups"]
    if len(groups) != 1:
        raise ValueError(f"one config group is supported, found {len(groups)}")
    scheme = next(iter(groups.values()))["weights"]
    bits, symmetric = int(scheme["num_bits"]), bool(scheme["symmetric"])
    group_size = scheme.get("group_size") if scheme.get("strategy") == "group" else None
    dense = _version(config.get("version")) >= (0, 18)  # older releases packed 32 // bits values per word
    weights = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        weights[name] = dequantize_compressed_tensors(
            tensors[key], tensors[f"{name}.weight_scale"], tensors.get(f"{name}.weight_zero_point"),
            tensors.get(f"{name}.weight_g_idx"), tensors[f"{name}.weight_shape"], bits, symmetric, group_size, dense=dense)
    return weights


def _version(text: str | None) -> tuple[int, ...]:
    if not text:
        return (0, 18)  # no version recorded: the current layout
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def gptq_tensors(name: str, quantized: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """A QuantizedWeight as the GPTQ checkpoint convention stores it: {name.qweight, .qzeros, .scales, .g_idx}."""
    rows, cols = quantized.shape
    g_idx = quantized.g_idx if quantized.g_idx is not None else torch.arange(cols) // quantized.group_size
    stored_zeros = encode_gptq_zeros(quantized.zeros().T, quantized.bits, checkpoint_format)
    return {f"{name}.qweight": pack_gptq_qweight(quantized.ints(), quantized.bits),
            f"{name}.qzeros": pack_gptq_qzeros(stored_zeros, quantized.bits),
            f"{name}.scales": quantized.scales.T.contiguous(), f"{name}.g_idx": g_idx.to(torch.int32)}
