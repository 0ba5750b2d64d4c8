"""Decode kernel (1-16 rows): y = x @ dequant(weight)^T + t @ dequant(up)^T + bias, split along K.

With a handful of rows a (rows, N) output has too few tiles to keep the GPU busy while the weight streams
in, so the K dimension is cut into SPLIT_K slices as well: program (n, s) dequantizes the weight tile of
columns block n over slice s and adds its partial sums into an fp32 output with atomics. Slice 0 also adds
the low-rank product t @ up^T and the bias. Reference: kernels.reference.matmul_reference.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from kernels.grid import QuantizedWeight
from kernels.tiles import INTERPRET, load_weight, matmul_args, mma

BLOCK_M = 16  # the smallest tl.dot tile: decode rows are padded up to it
MAX_ROWS = 16


def configs() -> list[triton.Config]:
    """Tile sizes and splits to autotune over on the GPU; one small config under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2})]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}, num_warps=4, num_stages=stages)
            for (n, k, split), stages in itertools.product(itertools.product((32, 64, 128), (128, 256), (1, 4, 8)),
                                                           (2, 4))]


@triton.autotune(configs=configs(), key=["M_BUCKET", "N", "K", "R"], reset_to_zero=["y_ptr"])
@triton.jit
def splitk_matmul_kernel(
        x_ptr, y_ptr, t_ptr, bias_ptr,
        w_ptr, w_scales, w_zeros, w_g_idx, w_stride_s,
        u_ptr, u_scales, u_zeros, u_g_idx, u_stride_s,
        M, N, K, R, stride_xm, M_BUCKET,
        W_BITS: tl.constexpr, W_GROUP_SIZE: tl.constexpr, W_SYMMETRIC: tl.constexpr, W_ACT_ORDER: tl.constexpr,
        U_BITS: tl.constexpr, U_GROUP_SIZE: tl.constexpr, U_SYMMETRIC: tl.constexpr, U_ACT_ORDER: tl.constexpr,
        HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = x_ptr.dtype.element_ty
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(pid_k * tiles_per_split, (pid_k + 1) * tiles_per_split):
        cols = tile * BLOCK_K + offs_k  # tiles past K load nothing: every mask below is false there
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=(offs_m[:, None] < M) & (cols[None, :] < K), other=0.0)
        w = load_weight(w_ptr, w_scales, w_zeros, w_g_idx, w_stride_s, offs_n[None, :], cols[:, None], N, K,
                        W_BITS, W_GROUP_SIZE, W_SYMMETRIC, W_ACT_ORDER)  # (BLOCK_K, BLOCK_N): weight^T
        acc = mma(x, w.to(dtype), acc, INTERPRET)
    if pid_k == 0:
        if HAS_LOWRANK:
            offs_r = tl.arange(0, BLOCK_R)
            for r in range(0, R, BLOCK_R):
                ranks = r + offs_r
                t = tl.load(t_ptr + offs_m[:, None] * R + ranks[None, :],
                            mask=(offs_m[:, None] < M) & (ranks[None, :] < R), other=0.0).to(dtype)
                u = load_weight(u_ptr, u_scales, u_zeros, u_g_idx, u_stride_s, offs_n[None, :], ranks[:, None], N, R,
                                U_BITS, U_GROUP_SIZE, U_SYMMETRIC, U_ACT_ORDER)  # (BLOCK_R, BLOCK_N): up^T
                acc = mma(t, u.to(dtype), acc, INTERPRET)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc,
                  mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def splitk_matmul(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, t: torch.Tensor | None = None,
                  up: torch.Tensor | QuantizedWeight | None = None, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) @ weight^T (+ t @ up^T) (+ bias) -> (M, N) in `out_dtype` (default x's);
    weight (N, K), t (M, r), up (N, r).

    The sums are formed in fp32; out_dtype=torch.float32 returns them without a cast (for a t fed to the next launch).
    """
    x = x.contiguous()
    t = None if t is None else t.contiguous()
    y = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    args, constexprs = matmul_args(x, weight, t, up, bias, y)
    m, n = y.shape
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, BLOCK_M))  # noqa: E731
    splitk_matmul_kernel[grid](*args, BLOCK_M=BLOCK_M, **constexprs)
    return y.to(out_dtype or x.dtype)
