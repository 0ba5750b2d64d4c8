"""Pure-torch references of the kernels: the compressed linear y = x @ base^T + (x @ down^T) @ up^T + bias, and
one block of GPTQ's column loop."""
from __future__ import annotations

import torch

from kernels.grid import QuantizedWeight, dequantize, quantize_ints

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


def gptq_block_reference(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of GPTQ's column loop: quantize the columns in order, each rounding error pushed onto the block's
    later columns through the inverse Hessian (the reference's inner loop, IST-DASLab/gptq `fasterquant`).

    W1 (rows, B): the block's columns of W, updated by the earlier blocks; Hinv1 (B, B): the block's diagonal block
    of the upper Cholesky factor of H^-1; scale (rows, B) float32 and zero (rows, B) int32: each column's grid.
    Returns ints (rows, B) int32, Q (rows, B) float32 (dequantized), Err1 (rows, B) = (w - q) / Hinv_ii and the
    losses (rows,) sum (w - q)^2 / Hinv_ii^2 / 2, the last two in W1's dtype. W1 is not modified.
    """
    rows, cols = W1.shape
    W1 = W1.clone()
    ints = torch.zeros(rows, cols, dtype=torch.int32, device=W1.device)
    Q = torch.zeros(rows, cols, dtype=torch.float32, device=W1.device)
    Err1 = torch.zeros_like(W1)
    losses = torch.zeros(rows, dtype=W1.dtype, device=W1.device)
    for i in range(cols):
        w, column_scale, column_zero = W1[:, i:i + 1], scale[:, i:i + 1], zero[:, i:i + 1]
        ints[:, i:i + 1] = quantize_ints(w, column_scale, column_zero, bits)
        Q[:, i:i + 1] = dequantize(ints[:, i:i + 1], column_scale, column_zero, 1)
        err = (w - Q[:, i:i + 1].to(W1.dtype)) / Hinv1[i, i]
        losses += err.squeeze(1) ** 2 / 2
        W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
        Err1[:, i:i + 1] = err
    return ints, Q, Err1, losses
