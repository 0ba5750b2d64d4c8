"""Round-to-nearest quantization on a min-max grid, per group of input columns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quantize import GridConfig, Quantization
from kernels.grid import QuantizedWeight, find_params, make_quantized, quantize_ints


@dataclass(frozen=True)
class RTN(GridConfig):
    """Round each weight to the nearest point of its group's min-max grid; reads no calibration statistics."""


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """weight (out, in) -> QuantizedWeight; `group_size` must divide `in` (see grid.resolve_group_size)."""
    scales, zeros = find_params(weight, bits, group_size, symmetric)
    return make_quantized(quantize_ints(weight, scales, zeros, bits), scales, zeros, bits, symmetric)


def quantize_rtn(weight: torch.Tensor, gram: torch.Tensor | None, config: RTN) -> Quantization:
    """weight (out, in) on the grid of `config` (its group size must divide `in`); the Gram is not read."""
    return Quantization(round_to_nearest(weight.float(), config.bits, config.group_size, config.symmetric))
