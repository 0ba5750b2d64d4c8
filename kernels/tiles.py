"""Tile loaders shared by the Triton kernels: a weight tile dequantized in registers, and the launch arguments
that describe a weight (dense or kernels.grid.QuantizedWeight) to them. No kernel lives here.

Import this module only when a Triton kernel is to run: `triton.jit` reads TRITON_INTERPRET when it decorates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.grid import QuantizedWeight

INTERPRET = triton.knobs.runtime.interpret


@triton.jit
def unpack(ptr, rows, cols, stride, mask, BITS: tl.constexpr):
    """Values (rows, cols) of a packed matrix (kernels.grid.pack): int32, in the broadcast shape of rows and cols."""
    position = cols * BITS  # bit offset of the value in its row's little-endian bitstream
    word = position // 32
    shift = position % 32
    # Shifts on uint32, so that right shifts bring in zeros rather than copies of the sign bit.
    low = tl.load(ptr + rows * stride + word, mask=mask, other=0).to(tl.uint32, bitcast=True)
    values = low >> shift
    if 32 % BITS != 0:  # 3 bits: a value may straddle two words; the run of 32 values ends on a word boundary
        straddles = shift > 32 - BITS
        high = tl.load(ptr + rows * stride + word + 1, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
        values |= high << ((32 - shift) & 31)
    return (values & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def load_weight(w_ptr, s_ptr, z_ptr, g_ptr, stride_s, rows, cols, n_rows, n_cols,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SYMMETRIC: tl.constexpr, ACT_ORDER: tl.constexpr):
    """fp32 tile weight[rows, cols] of an (n_rows, n_cols) weight, 0 outside it; dense (contiguous) when BITS == 0.

    rows and cols broadcast against each other, so the same loader gives a (rows, cols) or a transposed tile.
    """
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok & col_ok
    if BITS == 0:
        tile = tl.load(w_ptr + rows * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        q = unpack(w_ptr, rows, cols, tl.cdiv(n_cols, 32) * BITS, mask, BITS)
        if ACT_ORDER:
            group = tl.load(g_ptr + cols, mask=col_ok, other=0)
        else:
            group = cols // GROUP_SIZE
        scale = tl.load(s_ptr + rows * stride_s + group, mask=mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            zero = 1 << (BITS - 1)
        else:  # zeros are packed along the rows, one packed row per group
            zero = unpack(z_ptr, group, rows, tl.cdiv(n_rows, 32) * BITS, mask, BITS)
        tile = (q - zero).to(tl.float32) * scale
    return tile


@triton.jit
def mma(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation (fp32 operands without TF32 rounding, as torch.matmul does by default)."""
    if INTERPRET:  # triton's interpreter gets bf16 dots wrong; its fp32 dot of the already rounded values is exact
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def weight_args(weight: torch.Tensor | QuantizedWeight) -> tuple[tuple, dict]:
    """(pointers and scale row stride, constexprs) that describe `weight` to `load_weight`, in its argument order."""
    if isinstance(weight, QuantizedWeight):
        qzeros = weight.qzeros if weight.qzeros is not None else weight.scales
        g_idx = weight.g_idx if weight.g_idx is not None else weight.scales
        scales = weight.scales.contiguous()
        tensors = (weight.qweight.contiguous(), scales, qzeros.contiguous(), g_idx.contiguous(), scales.stride(0))
        return tensors, {"BITS": weight.bits, "GROUP_SIZE": weight.group_size, "SYMMETRIC": weight.qzeros is None,
                         "ACT_ORDER": weight.g_idx is not None}
    weight = weight.contiguous()  # unused pointers point at the weight itself
    return (weight, weight, weight, weight, 0), {"BITS": 0, "GROUP_SIZE": 1, "SYMMETRIC": True, "ACT_ORDER": False}


def matmul_args(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, t: torch.Tensor | None,
                up: torch.Tensor | QuantizedWeight | None, bias: torch.Tensor | None,
                y: torch.Tensor) -> tuple[list, dict]:
    """(arguments, constexprs) of a matmul kernel: y = x @ weight^T (+ t @ up^T) (+ bias); both kernels take these."""
    (m, k), (n, rank) = x.shape, (weight.shape[0], 0 if t is None else t.shape[1])
    weight_tensors, weight_flags = weight_args(weight)
    up_tensors, up_flags = weight_args(up if up is not None else x)
    args = [x, y, t if t is not None else x, bias if bias is not None else x, *weight_tensors, *up_tensors,
            m, n, k, rank, x.stride(0), triton.next_power_of_2(m)]
    constexprs = {**{f"W_{name}": value for name, value in weight_flags.items()},
                  **{f"U_{name}": value for name, value in up_flags.items()},
                  "HAS_LOWRANK": t is not None, "HAS_BIAS": bias is not None, "INTERPRET": INTERPRET,
                  "BLOCK_R": max(16, min(64, triton.next_power_of_2(rank)))}
    return args, constexprs
