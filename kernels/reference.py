"""Pure-torch reference of the compressed linear: y = x @ base^T + (x @ down^T) @ up^T + bias."""
from __future__ import annotations

import torch

from kernels.grid import QuantizedWeight

Operand = torch.Tensor | QuantizedWeight | None


def materialize(operand: Operand, dtype: torch.dtype) -> torch.Tensor | None:
    """A dense weight of `dtype` from a dense or quantized operand (None stays None)."""
    if operand is None:
        return None
    if isinstance(operand, QuantizedWeight):
        return operand.dequantize(dtype)
    return operand.to(dtype)


def lowrank_linear_reference(x: torch.Tensor, base: Operand, up: Operand, down: Operand,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out). `base` (out, in), `up` (out, r), `down` (r, in); each dense, quantized or absent."""
    base_w, up_w, down_w = (materialize(t, x.dtype) for t in (base, up, down))
    y = None
    if base_w is not None:
        y = x @ base_w.T
    if up_w is not None:
        lowrank = (x @ down_w.T) @ up_w.T
        y = lowrank if y is None else y + lowrank
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def matmul_reference(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, t: torch.Tensor | None = None,
                     up: Operand = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight^T (+ t @ up^T) (+ bias) -> (M, N) in x's dtype: what each Triton matmul kernel computes."""
    y = x @ materialize(weight, x.dtype).T
    if t is not None:
        y = y + t.to(x.dtype) @ materialize(up, x.dtype).T
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
