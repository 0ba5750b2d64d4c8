"""Round-to-nearest quantization on a min-max grid, per group of input columns."""
import torch

from kernels.grid import QuantizedWeight, find_params, make_quantized, quantize_ints


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """weight (out, in) -> QuantizedWeight; `group_size` must divide `in` (see grid.resolve_group_size)."""
    scales, zeros = find_params(weight, bits, group_size, symmetric)
    return make_quantized(quantize_ints(weight, scales, zeros, bits), scales, zeros, bits, symmetric)
