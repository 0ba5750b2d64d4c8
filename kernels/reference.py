"""Pure-torch references of the kernels: the compressed linear y = x @ base^T + (x @ down^T) @ up^T + bias, and
one block of GPTQ's column loop."""
from __future__ import annotations

import torch

from kernels.grid import QuantizedWeight, dequantize, quantize_ints

Operand = torch.Tensor | QuantizedWeight | None
LARGE_BYTES = 1 << 30  # a quantized base whose dense copy would be larger is multiplied a block of rows at a time


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
    large = isinstance(base, QuantizedWeight) and base.shape[0] * base.shape[1] * x.element_size() > LARGE_BYTES
    base_w, up_w, down_w = (materialize(t, x.dtype) for t in (None if large else base, up, down))
    y = None
    if large:  # a block of the weight's rows at a time: no dense copy of it (a 405B MLP weight: 3.25 GiB)
        y = x.new_empty(*x.shape[:-1], base.shape[0])
        for start, rows in base.row_blocks(x.dtype, max(1, LARGE_BYTES // 4 // (base.shape[1] * x.element_size()))):
            y[..., start:start + len(rows)] = x @ rows.T
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


@torch.no_grad()
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
    # transposed, so that each column is a contiguous row; a handful of in-place operations per column, because on a
    # CPU this loop's time is per-operation overhead (576-row columns)
    WT = W1.T.contiguous()
    scaleT, zeroT = scale.T.float().contiguous(), zero.T.float().contiguous()
    QT = torch.empty(cols, rows, dtype=torch.float32, device=W1.device)
    ErrT = torch.empty_like(WT)
    # round(w / s) + z clamped to [0, maxq], minus z, is round(w / s) clamped to [-z, maxq - z]: exact in floats
    lows, highs = zeroT.neg(), zeroT.neg().add_(2**bits - 1)
    pivots, single = Hinv1.diagonal().tolist(), WT.dtype == torch.float32
    columns = zip(WT.unbind(0), QT.unbind(0), ErrT.unbind(0), scaleT.unbind(0), lows.unbind(0), highs.unbind(0),
                  Hinv1.unbind(0), pivots)
    for i, (w, q, err, s, low, high, h, pivot) in enumerate(columns):
        torch.div(w if single else w.float(), s, out=q)
        torch.round(q, out=q).clamp_(low, high).mul_(s)  # exact: an integer times the scale, as dequantize's
        torch.sub(w, q, out=err).div_(pivot)
        WT[i + 1:] -= torch.outer(h[i + 1:], err)  # rounded twice, as the kernel (no fused multiply-add)
    ints = torch.div(QT, scaleT).round_().add_(zeroT).to(torch.int32)  # (q - z) * s / s is q - z to within 1e-4
    halves = ErrT.square().div_(2)
    losses = torch.zeros(rows, dtype=W1.dtype, device=W1.device)
    for half in halves:  # summed column by column, in the order the kernel sums them
        losses += half
    return ints.T, QT.T, ErrT.T, losses
