"""One block of GPTQ's column loop in one launch: the Triton twin of kernels.reference.gptq_block_reference.

The reference loop issues about ten small torch operations per column: an 8B model has about 40k columns per
decoder block, so on a GPU its time is kernel launches. Here each program holds a tile of rows of the block
(BLOCK_R, B) in registers and walks the B columns itself; rows are independent, so no program waits on another.
The arithmetic is the reference's, operation for operation (IEEE division, round half to even, no fused
multiply-add), so both paths give the same bits.

Import this module only when the kernel is to run: `triton.jit` reads TRITON_INTERPRET when it decorates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.tiles import INTERPRET


def configs() -> list[triton.Config]:
    """Rows per program and warps to autotune over on the GPU (a (16, 128) float64 tile is 16 KB of registers);
    one config under the interpreter, where tuning means nothing."""
    if INTERPRET:
        return [triton.Config({"BLOCK_R": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_R": block_r}, num_warps=warps) for block_r in (4, 8, 16, 32) for warps in (1, 2, 4)]


@triton.jit
def round_half_even(x):
    """torch.round of float32 values: to the nearest integer, ties to the even one (x - floor(x) is exact)."""
    down = tl.floor(x)
    fraction = x - down
    odd = (down - 2.0 * tl.floor(down * 0.5)) != 0.0
    return tl.where((fraction > 0.5) | ((fraction == 0.5) & odd), down + 1.0, down)


@triton.autotune(configs=configs(), key=["rows", "cols"])
@triton.jit
def gptq_block_kernel(w_ptr, h_ptr, scale_ptr, zero_ptr, ints_ptr, q_ptr, err_ptr, loss_ptr,
                      rows, cols, stride_w_row, stride_w_col, stride_h_row, stride_h_col,
                      BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Only W's tile lives in registers; each column's grid is loaded and its results stored as the loop reaches it,
    # so per column the work on the whole tile is two passes: take column i out, push its error onto the rest.
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    col = tl.arange(0, BLOCK_C)[None, :]
    W = tl.load(w_ptr + row[:, None] * stride_w_row + col * stride_w_col,
                mask=row_ok[:, None] & (col < cols), other=0.0)
    loss = tl.zeros((BLOCK_R,), dtype=W.dtype)
    for i in range(0, cols):
        w = tl.sum(tl.where(col == i, W, 0.0), axis=1)  # column i: one term, exact
        s = tl.load(scale_ptr + row * cols + i, mask=row_ok, other=1.0)
        z = tl.load(zero_ptr + row * cols + i, mask=row_ok, other=0)
        q_int = tl.minimum(tl.maximum(round_half_even(tl.div_rn(w.to(tl.float32), s)) + z.to(tl.float32), 0.0),
                           2**BITS - 1).to(tl.int32)
        q = (q_int - z).to(tl.float32) * s
        err = (w - q.to(W.dtype)) / tl.load(h_ptr + i * (stride_h_row + stride_h_col))
        loss += err * err / 2
        h = tl.load(h_ptr + i * stride_h_row + col * stride_h_col, mask=(col >= i) & (col < cols), other=0.0)
        W = W - err[:, None] * h
        tl.store(ints_ptr + row * cols + i, q_int, mask=row_ok)
        tl.store(q_ptr + row * cols + i, q, mask=row_ok)
        tl.store(err_ptr + row * cols + i, err, mask=row_ok)
    tl.store(loss_ptr + row, loss, mask=row_ok)


def gptq_block_triton(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels.reference.gptq_block_reference in one launch (same arguments, same results)."""
    rows, cols = W1.shape
    scale, zero = scale.float().contiguous(), zero.to(torch.int32).contiguous()
    ints = torch.empty(rows, cols, dtype=torch.int32, device=W1.device)
    Q = torch.empty(rows, cols, dtype=torch.float32, device=W1.device)
    Err1 = torch.empty(rows, cols, dtype=W1.dtype, device=W1.device)
    losses = torch.empty(rows, dtype=W1.dtype, device=W1.device)
    gptq_block_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
        W1, Hinv1, scale, zero, ints, Q, Err1, losses, rows, cols, *W1.stride(), *Hinv1.stride(),
        BITS=bits, BLOCK_C=triton.next_power_of_2(cols),
        enable_fp_fusion=False)  # w - err * h rounded twice, as the reference's outer product and subtraction
    return ints, Q, Err1, losses
