"""CPU serving of quantized layers through torch's weight-only CPU kernels, which read the integers directly instead
of dequantizing the weight on every call: 2-, 3- and 4-bit grids through the int4 kernel (`Int4CPU`), 8-bit grids
through the int8 kernel (`Int8CPU`).

The kernel computes in bfloat16: y = x @ W^T with W[o, i] = s[g, o] * (q[o, i] - 8) + m[g, o], s and m bfloat16 per
group g. The project's grid W = s * (q - z) is the same with m = s * (8 - z); the integers carry over unchanged, the
scales are rounded to bfloat16 (8 bits of mantissa against fp16's 11), so outputs differ from the float32 reference
by bfloat16 rounding (about 3e-3 relative). A 2- or 3-bit integer sits in a 4-bit field, moved to its centre
(q + 8 - 2^(bits-1), the zero moved alike, so s (q - z) is unchanged): the compact layout of those grids is half a
byte per weight. It takes weights of at most 4 bits without act-order groups whose output width is a multiple of 16
(the kernel's tile); everything else keeps the reference path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.grid import QuantizedWeight

TILE = 16  # the kernel's output tile: out_features must be a multiple of it


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@dataclass
class Int4CPU:
    """A weight of at most 4 bits prepacked for the CPU kernel: packed (out, in / 2) uint8, scales_and_zeros
    (groups, out, 2) bfloat16."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    out_features: int

    @classmethod
    def from_quantized(cls, quantized: QuantizedWeight) -> "Int4CPU | None":
        """The prepacked weight, or None where the kernel cannot take it (over 4 bits, act-order groups, shapes)."""
        rows, cols = quantized.shape
        if (not int4_available() or quantized.bits > 4 or quantized.g_idx is not None or rows % TILE or cols % 2
                or quantized.group_size % 2):
            return None
        # W = s (q - z) = s (q' - 8) + s (8 - z'), q' = q + c, z' = z + c: c centres a 2/3-bit grid in the field,
        # so that the kernel's bfloat16 terms stay as small as a 4-bit grid's (s (q' - 8) about +-8 s, not -8 s)
        centre = 8 - 2 ** (quantized.bits - 1)
        scales = quantized.scales.float()
        shift = scales * (8 - quantized.zeros().float() - centre)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((quantized.ints() + centre).contiguous(), 1)
        scales_and_zeros = torch.stack([scales, shift], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(packed, scales_and_zeros, quantized.group_size, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) of any float dtype -> (..., out) in x's dtype, computed in bfloat16."""
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


@dataclass
class Int8CPU:
    """An 8-bit weight unpacked once to int8 for torch's int8 kernel (`_weight_int8pack_mm`, bfloat16), which takes
    one scale per output channel: a grid with groups runs it once per group of columns,

        y = sum_g s_g * (x_g @ (q_g - z_g)^T) = sum_g kernel(x_g, q_g - 128, s_g) - s_g (z_g - 128) sum(x_g),

    the integers shifted to int8 (q - 128) and the zero with them. weights (groups, out, group_size) int8, scales
    (groups, out) bfloat16, offsets (groups, out) float32 = s (z - 128), zero for a symmetric grid: 1 byte per weight,
    the packed size."""

    weights: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    out_features: int

    @classmethod
    def from_quantized(cls, quantized: QuantizedWeight) -> "Int8CPU | None":
        """The unpacked weight, or None where the kernel cannot take it (not 8-bit, act-order groups)."""
        rows, cols = quantized.shape
        if not int8_available() or quantized.bits != 8 or quantized.g_idx is not None:
            return None
        groups = cols // quantized.group_size
        shifted = (quantized.ints() - 128).to(torch.int8).reshape(rows, groups, quantized.group_size)
        scales = quantized.scales.float()
        offsets = None if quantized.symmetric else (scales * (quantized.zeros() - 128)).T.contiguous()
        return cls(shifted.transpose(0, 1).contiguous(), scales.T.contiguous().to(torch.bfloat16), offsets, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) of any float dtype -> (..., out) in x's dtype, computed in bfloat16, accumulated in float32."""
        groups, _, size = self.weights.shape
        rows = x.reshape(-1, groups, size).to(torch.bfloat16)
        y = torch.zeros(rows.shape[0], self.out_features, dtype=torch.float32)
        for g in range(groups):
            y += torch.ops.aten._weight_int8pack_mm(rows[:, g].contiguous(), self.weights[g], self.scales[g]).float()
        if self.offsets is not None:
            y -= rows.float().sum(-1) @ self.offsets
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weights, self.scales, self.offsets) if t is not None)
