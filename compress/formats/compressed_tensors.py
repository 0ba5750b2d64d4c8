"""compressed-tensors `pack-quantized` checkpoints (llm-compressor): the integer layout and reading.

Layout (vllm-project/compressed-tensors `compressors/pack_quantized/{base,helpers}.py`,
`quantization/lifecycle/forward*.py`, `quantization/utils/helpers.py`); `weight` is (out_features, in_features):
  The library quantizes to SIGNED ints q in [-2**(bits-1), 2**(bits-1)) (calculate_range), for symmetric and
  asymmetric schemes alike; asymmetric zero points are signed too, and symmetric schemes have zero point 0 and store
  none. `pack_to_int32` adds 2**(bits-1) before packing, so the stored field is u = q + 2**(bits-1) (vLLM reads it as
  uint4b8 / uint8b128): an unsigned grid value with symmetric zero 2**(bits-1) is stored unchanged.
  weight_packed (out, ceil(in*bits/32)) int32, packed along the input dim; weight_scale (out, groups) (groups = 1 for
  strategy "channel"); weight_shape = tensor([out, in]); weight_g_idx (in,) int32 only with actorder "group"
  (all -1 means column order). Asymmetric group/channel zero points: since compressed-tensors 0.10.0 (#296) packed
  along dim 0 with the same offset, (ceil(out*bits/32), groups) int32; before that a plain signed (out, groups) int8.
  Since 0.18.0 (#732) packing is dense (32 values -> `bits` words, the same bitstream as GPTQ's); before that each
  word held 32 // bits values from bit 0 with the high bits unused. The two agree for 1/2/4/8 bits and differ for
  3 (5, 6, 7) bits; `dense=False` reads and writes the older layout. config.json carries
  "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "<library>",
  "quantization_status": "compressed", "ignore": [...], "config_groups": {"group_0": {"targets": ["Linear"],
  "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group", "group_size": 128,
  "actorder": null, "dynamic": false}}}}.
  W = weight_scale[o, g(i)] * (q[o, i] - zero_point[o, g(i)]).

Reading: `read_pack_quantized` dequantizes every quantized linear of a checkpoint exactly. Writing:
`write_compressed_tensors` turns a compressed model's quantized bases into such a checkpoint, the integers carried
over unchanged (the grid's unsigned int is the stored field), one config group per grid (a --bpw mix: several, each
naming its modules), and the low-rank parts beside it as a PEFT LoRA adapter, as the GPTQ export does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compress.errors import CompressError
from compress.formats.gptq import (WORD, GPTQLayer, gptq_layers, merged_warnings, pack_words, plain_linears,
                                   quantized_state, save_quantized, unpack_words, write_adapter)
from kernels import grid
from kernels.grid import QuantizedWeight

if TYPE_CHECKING:
    from compress.formats import ExportOptions

CT_VERSION = "0.18.0"  # the first release that packs densely, as written here
VLLM_BITS = (4, 8)  # vLLM's compressed-tensors WNA16 kernels
QUANTIZED_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


def pack_fields(values: torch.Tensor, bits: int, dense: bool = True) -> torch.Tensor:
    """(rows, n) ints in [0, 2**bits) -> (rows, words) int32, packed along the last dim from bit 0 of word 0.

    dense: GPTQ's bitstream, ceil(n*bits/32) words. Not dense (before 0.18): 32 // bits values per word, value j of
    a word at shift j*bits, the high bits unused; ceil(n / (32 // bits)) words.
    """
    if dense:
        return pack_words(values, bits)
    rows, n = values.shape
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) to pack into {bits} bits")
    per_word = WORD // bits
    words = -(-n // per_word)
    v = torch.nn.functional.pad(v, (0, words * per_word - n)).reshape(rows, words, per_word)
    shifts = torch.arange(per_word, device=v.device) * bits
    return grid.to_int32((v << shifts).sum(-1))


def unpack_fields(packed: torch.Tensor, bits: int, n: int, dense: bool = True) -> torch.Tensor:
    """Inverse of `pack_fields`: (rows, words) int32 -> (rows, n) int32 in [0, 2**bits)."""
    if dense:
        return unpack_words(packed, bits, n)
    rows, words = packed.shape
    per_word = WORD // bits
    if words != -(-n // per_word):
        raise ValueError(f"{words} packed words cannot hold exactly {n} values of {bits} bits "
                         f"(expected {-(-n // per_word)})")
    shifts = torch.arange(per_word, device=packed.device) * bits
    fields = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return fields.reshape(rows, -1)[:, :n].to(torch.int32)


def _ct_offset(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"pack-quantized packs 1..8 bits, not {bits}")
    return 2 ** (bits - 1)


def pack_compressed_tensors(ints: torch.Tensor, bits: int, *, dense: bool = True) -> torch.Tensor:
    """Signed ints (out, in) in [-2**(bits-1), 2**(bits-1)) -> weight_packed (out, ceil(in*bits/32)) int32.

    Also packs a (out, groups) zero point when given its transpose: `pack_compressed_tensors(zp.T, bits).T`.
    """
    return pack_fields(ints.to(torch.int64) + _ct_offset(bits), bits, dense)


def unpack_compressed_tensors(weight_packed: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Tensor,
                              *, dense: bool = True) -> torch.Tensor:
    """weight_packed (out, ceil(in*bits/32)) int32 -> signed ints (out, in) int32; `shape` is weight_shape."""
    out_features, in_features = (int(s) for s in shape)
    if weight_packed.shape[0] != out_features:
        raise ValueError(f"weight_packed has {weight_packed.shape[0]} rows, weight_shape says {out_features}")
    return unpack_fields(weight_packed, bits, in_features, dense) - _ct_offset(bits)


def _ct_zero_points(weight_zero_point: torch.Tensor, bits: int, out_features: int, groups: int,
                    dense: bool) -> torch.Tensor:
    """Signed zero points (out, groups) from either the packed (>= 0.10) or the plain (< 0.10) layout."""
    packed_rows = -(-out_features * bits // WORD) if dense else -(-out_features // (WORD // bits))
    if weight_zero_point.dtype == torch.int32 and tuple(weight_zero_point.shape) == (packed_rows, groups):
        return unpack_compressed_tensors(weight_zero_point.T, bits, (groups, out_features), dense=dense).T
    if tuple(weight_zero_point.shape) == (out_features, groups):
        return weight_zero_point.to(torch.int32)
    raise ValueError(f"weight_zero_point {tuple(weight_zero_point.shape)} {weight_zero_point.dtype} is neither "
                     f"packed int32 ({packed_rows}, {groups}) nor plain ({out_features}, {groups})")


def dequantize_compressed_tensors(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                                  weight_zero_point: torch.Tensor | None, weight_g_idx: torch.Tensor | None,
                                  weight_shape: tuple[int, int] | torch.Tensor, bits: int, symmetric: bool,
                                  group_size: int | None, *, dense: bool = True) -> torch.Tensor:
    """pack-quantized tensors -> weight (out, in) float32: W[o, i] = scale[o, g(i)] * (q[o, i] - zp[o, g(i)]).

    weight_scale (out, groups); group_size None means strategy "channel" (groups = 1); zp = 0 when symmetric.
    """
    out_features, in_features = (int(s) for s in weight_shape)
    groups = weight_scale.shape[1]
    if group_size is None:
        group_size = in_features
    if weight_scale.shape[0] != out_features or groups * group_size != in_features:
        raise ValueError(f"weight_scale {tuple(weight_scale.shape)} does not split a ({out_features}, {in_features}) "
                         f"weight into groups of {group_size}")
    q = unpack_compressed_tensors(weight_packed, bits, (out_features, in_features), dense=dense)
    if symmetric:
        if weight_zero_point is not None:
            raise ValueError("symmetric pack-quantized weights store no weight_zero_point")
        zp = torch.zeros(out_features, groups, dtype=torch.int32, device=q.device)
    else:
        if weight_zero_point is None:
            raise ValueError("asymmetric pack-quantized weights need weight_zero_point")
        zp = _ct_zero_points(weight_zero_point, bits, out_features, groups, dense)
    if weight_g_idx is None or bool((weight_g_idx == -1).any()):  # -1: g_idx never filled in, column order
        g = torch.arange(in_features, device=q.device) // group_size
    else:
        g = weight_g_idx.long()
        # The library sorts columns by g_idx and cuts the result into runs of group_size; indexing by g_idx is the
        # same map exactly when every group holds group_size columns, which actorder's g_idx always does.
        if g.min() < 0 or g.max() >= groups or not bool((torch.bincount(g, minlength=groups) == group_size).all()):
            raise ValueError(f"weight_g_idx must assign exactly {group_size} columns to each of {groups} groups")
    # A bf16/fp16 scale times a small integer is exact in float32; cast to the scale's dtype for the library's values.
    return weight_scale.float()[:, g] * (q - zp[:, g]).float()


def read_pack_quantized(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """{module name: dequantized weight (out, in) float32} of every `<name>.weight_packed` in a checkpoint's tensors.

    config: its quantization_config (its version picks the dense or the older packing; each module takes the scheme
    of the config group that names it, else of the one targeting every Linear)."""
    dense = _version(config.get("version")) >= (0, 18)  # older releases packed 32 // bits values per word
    weights = {}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        scheme = module_scheme(name, config)
        bits, symmetric = int(scheme["num_bits"]), bool(scheme["symmetric"])
        group_size = scheme.get("group_size") if scheme.get("strategy") == "group" else None
        weights[name] = dequantize_compressed_tensors(
            tensors[key], tensors[f"{name}.weight_scale"], tensors.get(f"{name}.weight_zero_point"),
            tensors.get(f"{name}.weight_g_idx"), tensors[f"{name}.weight_shape"], bits, symmetric, group_size,
            dense=dense)
    return weights


def module_scheme(name: str, config: dict) -> dict:
    """The weights scheme of one module: the config group whose targets name it (exactly or by an "re:" pattern),
    else the group targeting "Linear"."""
    import re

    fallback = None
    for group in config["config_groups"].values():
        for target in group.get("targets", []):
            if target == name or (target.startswith("re:") and re.match(target[3:], name)):
                return group["weights"]
            if target == "Linear":
                fallback = group["weights"]
    if fallback is None:
        raise ValueError(f"no config group targets {name}")
    return fallback


def ct_tensors(name: str, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A QuantizedWeight as pack-quantized stores it. The stored field is the signed int plus 2**(bits-1), which is
    the grid's unsigned int itself; the signed zero point is the grid's zero minus 2**(bits-1) (0 when symmetric)."""
    bits = quantized.bits
    tensors = {f"{name}.weight_packed": pack_fields(quantized.ints(), bits),
               f"{name}.weight_scale": quantized.scales.contiguous(),
               f"{name}.weight_shape": torch.tensor(list(quantized.shape))}
    if not quantized.symmetric:  # packed along the output dim, with the same offset: the grid's zeros
        tensors[f"{name}.weight_zero_point"] = pack_fields(quantized.zeros().T, bits).T.contiguous()
    return tensors


def ct_scheme(quantized: QuantizedWeight) -> dict:
    channel = quantized.group_size >= quantized.shape[1]
    return {"num_bits": quantized.bits, "type": "int", "symmetric": quantized.symmetric,
            "strategy": "channel" if channel else "group", "group_size": None if channel else quantized.group_size,
            "actorder": None, "dynamic": False, "observer": "minmax"}


def ct_config(layers: dict[str, GPTQLayer], ignore: list[str]) -> dict:
    """quantization_config: one config group targeting every Linear when all layers share a scheme, else one group
    per scheme naming its modules (largest first)."""
    schemes: dict[str, list[str]] = {}
    for name, layer in layers.items():
        schemes.setdefault(json.dumps(ct_scheme(layer.quantized), sort_keys=True), []).append(name)

    def size(names: list[str]) -> int:
        return sum(layers[n].quantized.shape[0] * layers[n].quantized.shape[1] for n in names)

    ordered = sorted(schemes.items(), key=lambda item: -size(item[1]))
    groups = {f"group_{i}": {"targets": ["Linear"] if len(schemes) == 1 else names, "weights": json.loads(scheme),
                             "input_activations": None, "output_activations": None, "format": "pack-quantized"}
              for i, (scheme, names) in enumerate(ordered)}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "version": CT_VERSION, "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def write_compressed_tensors(model: nn.Module, tokenizer, directory: Path, recipe: dict, options: "ExportOptions",
                             adapter_base: str) -> tuple[list[str], dict]:
    """The pack-quantized checkpoint (safetensors shards, config.json with its quantization_config) and adapter/
    when there are factors; layers without a quantized base are refused unless options.merge_lowrank."""
    layers = gptq_layers(model, recipe, options)
    reordered = [name for name, layer in layers.items() if layer.quantized.g_idx is not None]
    if reordered:
        raise CompressError(f"{reordered[0]} has act-order groups (g_idx), which compressed-tensors no longer holds "
                            "(removed in 0.20): compress with static groups (the default) or export --format gptq")
    plain = plain_linears(model)
    head = [name for name, module in model.named_modules() if module is model.get_output_embeddings()]
    config = ct_config(layers, plain + head)
    save_quantized(model, tokenizer, directory, quantized_state(model, layers, ct_tensors, "pack-quantized"), config,
                   options.max_shard_size)
    warnings = []
    odd = sorted({layer.quantized.bits for layer in layers.values()} - set(VLLM_BITS))
    if odd:
        warnings.append(f"{odd}-bit layers: vLLM's compressed-tensors kernels serve {VLLM_BITS[0]} and "
                        f"{VLLM_BITS[1]} bits; transformers and the compressed-tensors library read them")
    if plain:
        warnings.append(f"{len(plain)} linear layers the recipe left out (e.g. {plain[0]}) stay fp16, listed in "
                        "quantization_config.ignore")
    if len(config["config_groups"]) > 1:
        warnings.append(f"{len(config['config_groups'])} config groups (layers of several grids): vLLM and the "
                        "compressed-tensors library read each layer's own; transformers (5.x) decompresses every "
                        "dense layer with the first group's scheme, so load this export there only after "
                        "decompressing it with the library")
    checks = {"config_groups": len(config["config_groups"]),
              "bits": sorted({layer.quantized.bits for layer in layers.values()})}
    bits = (recipe.get("quantize") or {}).get("bits", 4)
    return warnings + merged_warnings(layers, options.merge_bits or bits), \
        {**checks, **write_adapter(layers, adapter_base, directory, warnings)}


def _version(text: str | None) -> tuple[int, ...]:
    if not text:
        return (0, 18)  # no version recorded: the current layout
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())
