"""Serving formats' integer layouts: GPTQ (AutoGPTQ / GPTQModel) and compressed-tensors `pack-quantized`.

Pure functions over tensors (no model, no files). `weight` is (out_features, in_features) throughout.

GPTQ (AutoGPTQ `qlinear_cuda_old.py` pack/forward; GPTQModel `nn_modules/qlinear/__init__.py` pack_original,
`utils/model_dequant.py`, `utils/model.py` v1<->v2):
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

compressed-tensors `pack-quantized` (vllm-project/compressed-tensors `compressors/pack_quantized/{base,helpers}.py`,
`quantization/lifecycle/forward*.py`, `quantization/utils/helpers.py`):
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
"""
from __future__ import annotations

from typing import Literal

import torch

from kernels import grid

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
WORD = 32
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# Bit packing along the last dim, shared by both formats.

def _pack_last(values: torch.Tensor, bits: int, dense: bool = True) -> torch.Tensor:
    """(rows, n) ints in [0, 2**bits) -> (rows, words) int32, packed along the last dim from bit 0 of word 0.

    dense: value k at stream bits [k*bits, (k+1)*bits), crossing words where needed; ceil(n*bits/32) words.
    not dense: 32 // bits values per word, value j of a word at shift j*bits; ceil(n / (32 // bits)) words.
    """
    rows, n = values.shape
    v = values.to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) to pack into {bits} bits")
    if not dense:
        per_word = WORD // bits
        words = -(-n // per_word)
        v = torch.nn.functional.pad(v, (0, words * per_word - n)).reshape(rows, words, per_word)
        shifts = torch.arange(per_word, device=v.device) * bits
        return grid.to_int32((v << shifts).sum(-1))
    return grid.pack(v, bits)[:, : -(-n * bits // WORD)]  # the grid's bitstream, without its padding words


def _unpack_last(packed: torch.Tensor, bits: int, n: int, dense: bool = True) -> torch.Tensor:
    """Inverse of `_pack_last`: (rows, words) int32 -> (rows, n) int32 in [0, 2**bits)."""
    rows, words = packed.shape
    expected = -(-n * bits // WORD) if dense else -(-n // (WORD // bits))
    if words != expected:
        raise ValueError(f"{words} packed words cannot hold exactly {n} values of {bits} bits (expected {expected})")
    w = packed.to(torch.int64) & _MASK32
    mask = 2**bits - 1
    if not dense:
        per_word = WORD // bits
        shifts = torch.arange(per_word, device=w.device) * bits
        return ((w.unsqueeze(-1) >> shifts) & mask).reshape(rows, -1)[:, :n].to(torch.int32)
    blocks = -(-n // WORD)
    return grid.unpack(torch.nn.functional.pad(packed, (0, blocks * bits - words)), bits, n)


# ---------------------------------------------------------------------------------------------------------------
# GPTQ

def _check_gptq(bits: int, length: int, what: str) -> None:
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ packs {GPTQ_BITS} bits, not {bits}")
    if length * bits % WORD:
        raise ValueError(f"GPTQ needs {what} * bits to fill whole int32 words: {what}={length}, bits={bits}")


def pack_gptq_qweight(ints: torch.Tensor, bits: int) -> torch.Tensor:
    """ints (out, in) in [0, 2**bits) -> qweight (in*bits/32, out) int32, packed along the input dim."""
    _check_gptq(bits, ints.shape[1], "in_features")
    return _pack_last(ints, bits).T.contiguous()


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight (in*bits/32, out) int32 -> ints (out, in) int32."""
    _check_gptq(bits, in_features, "in_features")
    return _unpack_last(qweight.T, bits, in_features)


def pack_gptq_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored zeros (groups, out) in [0, 2**bits) -> qzeros (groups, out*bits/32) int32, packed along the output dim.

    Pass `encode_gptq_zeros(zeros, bits, checkpoint_format)`: for v1 the stored field is zero - 1.
    """
    _check_gptq(bits, zeros.shape[1], "out_features")
    return _pack_last(zeros, bits)


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """qzeros (groups, out*bits/32) int32 -> stored zeros (groups, out) int32 (decode with `decode_gptq_zeros`)."""
    _check_gptq(bits, out_features, "out_features")
    return _unpack_last(qzeros, bits, out_features)


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
# compressed-tensors pack-quantized

def _ct_offset(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"pack-quantized packs 1..8 bits, not {bits}")
    return 2 ** (bits - 1)


def pack_compressed_tensors(ints: torch.Tensor, bits: int, *, dense: bool = True) -> torch.Tensor:
    """Signed ints (out, in) in [-2**(bits-1), 2**(bits-1)) -> weight_packed (out, ceil(in*bits/32)) int32.

    Also packs a (out, groups) zero point when given its transpose: `pack_compressed_tensors(zp.T, bits).T`.
    """
    return _pack_last(ints.to(torch.int64) + _ct_offset(bits), bits, dense)


def unpack_compressed_tensors(weight_packed: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Tensor,
                              *, dense: bool = True) -> torch.Tensor:
    """weight_packed (out, ceil(in*bits/32)) int32 -> signed ints (out, in) int32; `shape` is weight_shape."""
    out_features, in_features = (int(s) for s in shape)
    if weight_packed.shape[0] != out_features:
        raise ValueError(f"weight_packed has {weight_packed.shape[0]} rows, weight_shape says {out_features}")
    return _unpack_last(weight_packed, bits, in_features, dense) - _ct_offset(bits)


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
