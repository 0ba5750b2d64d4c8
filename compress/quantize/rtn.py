"""Round-to-nearest quantization on a min-max or MSE-clipped grid, per group of input columns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quantize import GridConfig, Quantization
from kernels.grid import QuantizedWeight, find_params, make_quantized, quantize_ints


@dataclass(frozen=True)
class RTN(GridConfig):
    """Round each weight to the nearest point of its group's grid; reads no calibration statistics."""


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                     clip: str = "minmax") -> QuantizedWeight:
    """weight (out, in) -> QuantizedWeight; `group_size` must divide `in` (see grid.resolve_group_size)."""
    scales, zeros = find_params(weight, bits, group_size, symmetric, clip)
    return make_quantized(quantize_ints(weight, scales, zeros, bits), scales, zeros, bits, symmetric)


def quantize_rtn(weight: torch.Tensor, gram: torch.Tensor | None, config: RTN,
                 cross: torch.Tensor | None = None) -> Quantization:
    """weight (out, in) on the grid of `config` (its group size must divide `in`); no statistics are read."""
    return Quantization(round_to_nearest(weight.float(), config.bits, config.group_size, config.symmetric,
                                         config.clip))
