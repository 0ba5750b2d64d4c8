"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers / vLLM): the integer layout, reading and writing.

Layout (AutoGPTQ `qlinear_cuda_old.py` pack/forward; GPTQModel `nn_modules/qlinear/__init__.py` pack_original,
`utils/model_dequant.py`, `utils/model.py` v1<->v2); `weight` is (out_features, in_features) throughout:
  qweight (in*bits/32, out) int32, packed along the INPUT dim; scales (groups, out) fp16;
  qzeros (groups, out*bits/32) int32, packed along the OUTPUT dim; g_idx (in,) int32, the group of each input column
  (arbitrary under act-order, i // group_size otherwise). Within a run of 32 values and `bits` words the layout is a
  little-endian bitstream: value k occupies stream bits [k*bits, (k+1)*bits), word w holds stream bits [32w, 32w+32).
  For 2/4/8 bits that is `32/bits` values per word, value j at shift j*bits. For 3 bits it is AutoGPTQ's 10|1|10|1|10
  pattern: word0 = values 0..9 and the low 2 bits of value 10; word1 = bit 2 of value 10, values 11..20 (shift 1) and
  bit 0 of value 21; word2 = bits 1..2 of value 21 and values 22..31 (shift 2).
  W[o, i] = scales[g_idx[i], o] * (q[o, i] - z[g_idx[i], o]). checkpoint_format "gptq" (v1) stores z - 1 in each
  field, "gptq_v2" stores z. GPTQModel decodes v1 as (stored + 1) mod 2**bits per field (`_correct_gptq_v1_qzeros`);
  so does this module, so a true zero of 0 is stored as 2**bits - 1.

Reading: `read_gptq` dequantizes every quantized linear of a checkpoint exactly. Writing: `write_gptq` turns a model
of CompressedLinear layers into the checkpoint (safetensors shards, config.json's quantization_config and
quantize_config.json, ../shared/PEERS.md section 4), with the low-rank part of `base + up @ down` beside it as a PEFT
LoRA adapter (compress.formats.lora).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from compress.errors import CompressError
from compress.formats.lora import ADAPTER, VLLM_LORA_RANKS, layer_factors, lora_rank, pad_factors, save_lora_adapter
from compress.layer import CompressedLinear, PackedTensor
from compress.quantize.gptq import GPTQ
from compress.quantize.rtn import round_to_nearest
from kernels import grid
from kernels.grid import QuantizedWeight, resolve_group_size

if TYPE_CHECKING:
    from compress.formats import ExportOptions

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANTIZED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # a quantized linear's tensors, `<name>.<suffix>`
MARLIN = {(4, True), (8, True)}  # (bits, sym) that vLLM's gptq_marlin kernel serves
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
WORD = 32


# ---------------------------------------------------------------------------------------------------------------
# The bitstream along the last dim (compressed-tensors >= 0.18 packs the same way)

def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) ints in [0, 2**bits) -> (rows, ceil(n*bits/32)) int32: value k at stream bits [k*bits, (k+1)*bits)
    from bit 0 of word 0, crossing words where needed."""
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) to pack into {bits} bits")
    return grid.pack(v, bits)[:, : -(-v.shape[1] * bits // WORD)]  # the grid's bitstream, without its padding words


def unpack_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_words`: (rows, ceil(n*bits/32)) int32 -> (rows, n) int32 in [0, 2**bits)."""
    words = packed.shape[1]
    expected = -(-n * bits // WORD)
    if words != expected:
        raise ValueError(f"{words} packed words cannot hold exactly {n} values of {bits} bits (expected {expected})")
    blocks = -(-n // WORD)
    return grid.unpack(torch.nn.functional.pad(packed, (0, blocks * bits - words)), bits, n)


# ---------------------------------------------------------------------------------------------------------------
# Layout

def _check_gptq(bits: int, length: int, what: str) -> None:
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ packs {GPTQ_BITS} bits, not {bits}")
    if length * bits % WORD:
        raise ValueError(f"GPTQ needs {what} * bits to fill whole int32 words: {what}={length}, bits={bits}")


def pack_gptq_qweight(ints: torch.Tensor, bits: int) -> torch.Tensor:
    """ints (out, in) in [0, 2**bits) -> qweight (in*bits/32, out) int32, packed along the input dim."""
    _check_gptq(bits, ints.shape[1], "in_features")
    return pack_words(ints, bits).T.contiguous()


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight (in*bits/32, out) int32 -> ints (out, in) int32."""
    _check_gptq(bits, in_features, "in_features")
    return unpack_words(qweight.T, bits, in_features)


def pack_gptq_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored zeros (groups, out) in [0, 2**bits) -> qzeros (groups, out*bits/32) int32, packed along the output dim.

    Pass `encode_gptq_zeros(zeros, bits, checkpoint_format)`: for v1 the stored field is zero - 1.
    """
    _check_gptq(bits, zeros.shape[1], "out_features")
    return pack_words(zeros, bits)


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """qzeros (groups, out*bits/32) int32 -> stored zeros (groups, out) int32 (decode with `decode_gptq_zeros`)."""
    _check_gptq(bits, out_features, "out_features")
    return unpack_words(qzeros, bits, out_features)


def _zero_offset(checkpoint_format: str) -> int:
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, not {checkpoint_format!r}")
    return 1 if checkpoint_format == "gptq" else 0


def encode_gptq_zeros(zeros: torch.Tensor, bits: int,
                      checkpoint_format: Literal["gptq", "gptq_v2"]) -> torch.Tensor:
    """True zeros (groups, out) -> stored fields (groups, out): (z - 1) mod 2**bits for v1 "gptq", z for "gptq_v2"."""
    return ((zeros.to(torch.int64) - _zero_offset(checkpoint_format)) % 2**bits).to(torch.int32)


def decode_gptq_zeros(stored: torch.Tensor, bits: int,
                      checkpoint_format: Literal["gptq", "gptq_v2"]) -> torch.Tensor:
    """Stored fields (groups, out) -> true zeros (groups, out): (s + 1) mod 2**bits for v1 "gptq", s for "gptq_v2"."""
    return ((stored.to(torch.int64) + _zero_offset(checkpoint_format)) % 2**bits).to(torch.int32)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, checkpoint_format: Literal["gptq", "gptq_v2"]) -> torch.Tensor:
    """GPTQ tensors -> weight (out, in) float32: W[o, i] = scales[g_idx[i], o] * (q[o, i] - z[g_idx[i], o])."""
    groups, out_features = scales.shape
    in_features = g_idx.shape[0]
    q = unpack_gptq_qweight(qweight, bits, in_features)
    z = decode_gptq_zeros(unpack_gptq_qzeros(qzeros, bits, out_features), bits, checkpoint_format)
    g = g_idx.long()
    if q.shape[0] != out_features or z.shape[0] != groups:
        raise ValueError(f"qweight {tuple(qweight.shape)} / qzeros {tuple(qzeros.shape)} do not match scales "
                         f"{tuple(scales.shape)}")
    if g.numel() and (g.min() < 0 or g.max() >= groups):
        raise ValueError(f"g_idx must index the {groups} groups of scales/qzeros")
    # fp16 scale times a small integer is exact in float32.
    return scales.float()[g].T * (q - z[g].T).float()


# ---------------------------------------------------------------------------------------------------------------
# Reading

def read_gptq(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """{module name: dequantized weight (out, in) float32} of every `<name>.qweight` in a checkpoint's tensors.

    config: its quantization_config (bits, group_size, checkpoint_format, and GPTQModel's per-module `dynamic`
    overrides); without g_idx, column i is in group i // group_size."""
    checkpoint_format = config.get("checkpoint_format", "gptq")
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        bits, group_size = module_grid(name, config)
        qweight = tensors[key]
        in_features = qweight.shape[0] * WORD // bits
        g_idx = tensors.get(f"{name}.g_idx")
        if g_idx is None:
            g_idx = torch.arange(in_features) // (group_size if group_size > 0 else in_features)
        weights[name] = dequantize_gptq(qweight, tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], g_idx, bits,
                                        checkpoint_format)
    return weights


def module_grid(name: str, config: dict) -> tuple[int, int]:
    """(bits, group_size) of one module: the config's, unless a positive `dynamic` rule matches its name (GPTQModel:
    keys are regular expressions matched at the start of the name, "+:" or no prefix to override, "-:" to skip)."""
    bits, group_size = int(config["bits"]), int(config.get("group_size", -1))
    for pattern, override in (config.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            continue
        if re.match(pattern.removeprefix("+:"), name):
            return int(override.get("bits", bits)), int(override.get("group_size", group_size))
    return bits, group_size


# ---------------------------------------------------------------------------------------------------------------
# Writing

def gptq_tensors(name: str, quantized: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """A QuantizedWeight as the GPTQ checkpoint convention stores it: {name.qweight, .qzeros, .scales, .g_idx}."""
    rows, cols = quantized.shape
    g_idx = quantized.g_idx if quantized.g_idx is not None else torch.arange(cols) // quantized.group_size
    stored_zeros = encode_gptq_zeros(quantized.zeros().T, quantized.bits, checkpoint_format)
    return {f"{name}.qweight": pack_gptq_qweight(quantized.ints(), quantized.bits),
            f"{name}.qzeros": pack_gptq_qzeros(stored_zeros, quantized.bits),
            f"{name}.scales": quantized.scales.T.contiguous(), f"{name}.g_idx": g_idx.to(torch.int32)}


@dataclass(frozen=True)
class GPTQLayer:
    """One linear as GPTQ holds it: the quantized base, its bias, and the factors (up, down) left for the adapter."""

    quantized: QuantizedWeight
    bias: torch.Tensor | None
    factors: tuple[torch.Tensor, torch.Tensor] | None
    merged: bool = False


def merge_grid(recipe: dict, options: ExportOptions, widths: set[int]) -> tuple[int, int, bool]:
    """(bits, group_size, symmetric) for requantizing merged layers of input `widths`: the recipe's grid, else 4-bit
    symmetric (Marlin's), with the first of the recipe's group size, 128, 64, 32 that divides every width (else 0: one
    group per row), since a GPTQ config holds one group size."""
    stage = recipe.get("quantize") or {}
    sizes = [stage["group_size"]] if stage.get("group_size") else [128, 64, 32]
    group_size = next((g for g in sizes if all(w % g == 0 for w in widths)), 0)
    return options.merge_bits or stage.get("bits", 4), group_size, stage.get("symmetric", True)


def gptq_layers(model: nn.Module, recipe: dict, options: ExportOptions) -> dict[str, GPTQLayer]:
    """Every CompressedLinear as a GPTQLayer; layers with no quantized base are refused unless merge_lowrank."""
    compressed = {name: layer for name, layer in model.named_modules() if isinstance(layer, CompressedLinear)}
    bits, group_size, symmetric = merge_grid(recipe, options, {layer.in_features for layer in compressed.values()})
    layers, refused = {}, []
    for name, layer in compressed.items():
        bias = None if layer.bias is None else layer.bias.detach()
        if isinstance(layer.base, PackedTensor):
            layers[name] = GPTQLayer(layer.base.operand(), bias, layer_factors(layer))
        elif options.merge_lowrank:
            weight = layer.weight_approx()
            quantized = round_to_nearest(weight, bits, resolve_group_size(weight.shape[1], group_size), symmetric)
            layers[name] = GPTQLayer(quantized, bias, None, merged=True)
        else:
            refused.append(name)
    if refused:
        kind = "pure low-rank" if model.get_submodule(refused[0]).base is None else "dense (unquantized)"
        raise CompressError(f"{len(refused)} layers have no quantized base that GPTQ can hold ({refused[0]} is "
                            f"{kind}): pass --merge-lowrank to merge and requantize them ({bits}-bit RTN), "
                            "or use --format dense")
    if not layers:
        raise CompressError("the model has no compressed layers to write as GPTQ")
    return layers


def gptq_config(layers: dict[str, GPTQLayer], recipe: dict, checkpoint_format: str) -> dict:
    """The quantization_config block: the most common bits and group size (by weights), and for layers that differ
    (a --bpw mix) a GPTQModel `dynamic` override each. sym and desc_act are one for all layers."""
    def grid(quantized: QuantizedWeight) -> tuple[int, int]:
        return quantized.bits, -1 if quantized.group_size >= quantized.shape[1] else quantized.group_size

    weights: dict[tuple[int, int], int] = {}
    for layer in layers.values():
        key = grid(layer.quantized)
        weights[key] = weights.get(key, 0) + layer.quantized.shape[0] * layer.quantized.shape[1]
    bits, group_size = max(weights, key=lambda key: (weights[key], key))
    dynamic = {f"+:^{re.escape(name)}$": {"bits": grid(layer.quantized)[0], "group_size": grid(layer.quantized)[1]}
               for name, layer in layers.items() if grid(layer.quantized) != (bits, group_size)}
    stage = recipe.get("quantize") or {}
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
              "sym": all(layer.quantized.symmetric for layer in layers.values()),
              "desc_act": any(layer.quantized.g_idx is not None for layer in layers.values()),
              "static_groups": bool(stage.get("static_groups", False)),
              "true_sequential": bool(recipe.get("true_sequential", False)),
              "damp_percent": stage.get("damp", GPTQ.damp), "lm_head": False, "pack_dtype": "int32",
              "checkpoint_format": checkpoint_format, "format": checkpoint_format,
              "meta": {"quantizer": ["compress-llm:0.1.0"],
                       "merged_lowrank_layers": sum(layer.merged for layer in layers.values())}}
    if dynamic:
        config["dynamic"] = dynamic
    return config


def serving_warnings(config: dict, zero_point_zeros: int) -> list[str]:
    """Where vLLM serves this checkpoint slowly or reads it wrongly (PEERS.md section 4)."""
    bits, sym, group_size, fmt = config["bits"], config["sym"], config["group_size"], config["checkpoint_format"]
    warnings = []
    scheme = f"{bits}-bit {'symmetric' if sym else 'asymmetric'}"
    if (bits, sym) not in MARLIN:
        warnings.append(f"{scheme} GPTQ misses vLLM's fast Marlin kernel (symmetric 4/8-bit only): it is served by the "
                        "slower gptq_gemm (ExLlama) path; compress with --sym and --wbits 4 or 8 for the fast path")
    elif group_size not in MARLIN_GROUP_SIZES:
        warnings.append(f"group size {group_size} is not one Marlin supports (-1, 32, 64, 128): vLLM falls back to "
                        "the slower gptq_gemm path")
    if fmt == "gptq_v2" and (not sym or bits == 2):
        warnings.append(f"vLLM's gptq_gemm path hard-codes the v1 zero offset and mis-reads {scheme} gptq_v2 "
                        "checkpoints (gibberish, vllm#26343): keep the default v1 'gptq' for vLLM")
    if zero_point_zeros:
        warnings.append(f"{zero_point_zeros} groups have zero point 0, which v1 'gptq' stores as {2**bits - 1} (z - 1 "
                        f"wraps): GPTQModel reads it back exactly, loaders that add 1 without wrapping read {2**bits}; "
                        "use --checkpoint-format gptq_v2 for GPTQModel/transformers or compress with --sym")
    if config["desc_act"]:
        warnings.append("act-order (desc_act): vLLM replicates scales and zeros of row-parallel layers on every "
                        "tensor-parallel rank")
    return warnings


def write_gptq(model: nn.Module, tokenizer, directory: Path, recipe: dict, options: ExportOptions,
               adapter_base: str) -> tuple[list[str], dict]:
    """The GPTQ checkpoint (safetensors shards, config.json + quantize_config.json) and adapter/ when there are
    factors."""
    layers = gptq_layers(model, recipe, options)
    config = gptq_config(layers, recipe, options.checkpoint_format)
    plain = plain_linears(model)
    if plain:  # layers the recipe left out stay fp16; GPTQModel's `dynamic` "-:" entries tell loaders to skip them
        config["dynamic"] = {**config.get("dynamic", {}), **{f"-:^{re.escape(name)}$": {} for name in plain}}
    state = quantized_state(model, layers, lambda name, quantized: gptq_tensors(name, quantized,
                                                                                options.checkpoint_format), "GPTQ")
    save_quantized(model, tokenizer, directory, state, config, options.max_shard_size)
    (directory / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")

    zero_point_zeros = 0
    asymmetric_v1 = options.checkpoint_format == "gptq" and not config["sym"]
    if asymmetric_v1:
        zero_point_zeros = sum(int((layer.quantized.zeros() == 0).sum()) for layer in layers.values())
    warnings = serving_warnings(config, zero_point_zeros)
    if asymmetric_v1:
        warnings.append("GPTQModel (7.6) refuses an asymmetric v1 checkpoint that it did not write itself: for "
                        "GPTQModel, export with --checkpoint-format gptq_v2")
    if plain:
        warnings.append(f"{len(plain)} linear layers the recipe left out (e.g. {plain[0]}) stay fp16, marked as "
                        "skipped in quantization_config.dynamic; vLLM cannot serve a fused qkv/gate_up layer that "
                        "mixes both")
    overridden = sum(not key.startswith("-:") for key in config.get("dynamic", {}))
    if overridden:
        warnings.append(f"{overridden} layers differ from the config's {config['bits']}-bit group "
                        f"{config['group_size']} and carry GPTQModel `dynamic` overrides: GPTQModel and vLLM read "
                        "them, older AutoGPTQ loaders do not")
    checks = {"dynamic_overrides": overridden, **{key: config[key] for key in ("bits", "group_size", "sym")}}
    return warnings + merged_warnings(layers, config["bits"]), \
        {**checks, **write_adapter(layers, adapter_base, directory, warnings)}


def plain_linears(model: nn.Module) -> list[str]:
    """The linears left uncompressed (the output head aside)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not model.get_output_embeddings()]


def save_quantized(model: nn.Module, tokenizer, directory: Path, state: dict[str, torch.Tensor], config: dict,
                   max_shard_size: str) -> None:
    """The checkpoint's tensors in safetensors shards, config.json with `config` as its quantization_config, the
    generation config and the tokenizer."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, directory, max_shard_size=max_shard_size, metadata={"format": "pt"})
    model.config.dtype = torch.float16
    model.config.save_pretrained(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf_config, "quantization_config": config}, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def merged_warnings(layers: dict[str, GPTQLayer], bits: int) -> list[str]:
    merged = [name for name, layer in layers.items() if layer.merged]
    return [f"{len(merged)} layers merged to base + up @ down and requantized ({bits}-bit RTN): their outputs differ "
            "from the compressed model's"] if merged else []


def write_adapter(layers: dict[str, GPTQLayer], adapter_base: str, directory: Path, warnings: list[str]) -> dict:
    """The layers' low-rank parts as a PEFT LoRA in directory/adapter (one rank, zero-padded to one vLLM accepts);
    returns the checks for the export record."""
    checks = {"layers": len(layers), "merged_layers": sum(layer.merged for layer in layers.values())}
    factors = {name: layer.factors for name, layer in layers.items() if layer.factors is not None}
    if factors:
        rank = lora_rank({down.shape[0] for _, down in factors.values()})
        if rank > VLLM_LORA_RANKS[-1]:
            warnings.append(f"LoRA rank {rank} is above vLLM's largest max_lora_rank (512)")
        padded = {name: pad_factors(up, down, rank) for name, (up, down) in factors.items()}
        save_lora_adapter(padded, adapter_base, directory / ADAPTER)
        checks.update(adapter_layers=len(factors), adapter_rank=rank,
                      factor_ranks=sorted({down.shape[0] for _, down in factors.values()}))
    return checks


def quantized_state(model: nn.Module, layers: dict[str, GPTQLayer], tensors, fmt: str) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized checkpoint: tensors(name, quantized) per layer (+ its fp16 bias), the rest of the
    model in fp16 (a tied head left out)."""
    prefixes = tuple(f"{name}." for name in layers)
    state = {key: (t.half() if t.is_floating_point() else t).contiguous() for key, t in model.state_dict().items()
             if not key.startswith(prefixes)}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for name, layer in layers.items():
        try:
            state.update(tensors(name, layer.quantized))
        except ValueError as exc:
            raise CompressError(f"{name} cannot be packed as {fmt}: {exc}") from None
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.half().contiguous()
    return state
