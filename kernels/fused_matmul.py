"""Prefill kernel: y = x @ dequant(weight)^T + t @ dequant(up)^T + bias, tiled as Triton tutorial 03.

Each program owns a (BLOCK_M, BLOCK_N) tile of y: it walks K dequantizing the weight tile in registers
(bits, group scales and zeros, act-order through g_idx), then adds the low-rank product of its rows of
t = x @ down^T (computed once, by an earlier launch) with its rows of up, and the bias, before the one store.
Reference: kernels.reference.matmul_reference (same signature as `fused_matmul`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.grid import QuantizedWeight
from kernels.tiles import INTERPRET, load_weight, matmul_args, mma


def configs() -> list[triton.Config]:
    """Tile sizes to autotune over on the GPU; one small tile under the interpreter, where tuning means nothing."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2})]
    tiles = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (64, 64, 128, 4, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
            for m, n, k, warps, stages in tiles]


@triton.autotune(configs=configs(), key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def fused_matmul_kernel(
        x_ptr, y_ptr, t_ptr, bias_ptr,
        w_ptr, w_scales, w_zeros, w_g_idx, w_stride_s,
        u_ptr, u_scales, u_zeros, u_g_idx, u_stride_s,
        M, N, K, R, stride_xm, M_BUCKET,
        W_BITS: tl.constexpr, W_GROUP_SIZE: tl.constexpr, W_SYMMETRIC: tl.constexpr, W_ACT_ORDER: tl.constexpr,
        U_BITS: tl.constexpr, U_GROUP_SIZE: tl.constexpr, U_SYMMETRIC: tl.constexpr, U_ACT_ORDER: tl.constexpr,
        HAS_LOWRANK: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks in turn reuse each weight column block while it is still in L2.
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=(offs_m[:, None] < M) & (cols[None, :] < K), other=0.0)
        w = load_weight(w_ptr, w_scales, w_zeros, w_g_idx, w_stride_s, offs_n[None, :], cols[:, None], N, K,
                        W_BITS, W_GROUP_SIZE, W_SYMMETRIC, W_ACT_ORDER)  # (BLOCK_K, BLOCK_N): weight^T
        acc = mma(x, w.to(dtype), acc, INTERPRET)
    if HAS_LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        for r in range(0, R, BLOCK_R):
            ranks = r + offs_r
            t = tl.load(t_ptr + offs_m[:, None] * R + ranks[None, :], mask=(offs_m[:, None] < M) & (ranks[None, :] < R),
                        other=0.0).to(dtype)
            u = load_weight(u_ptr, u_scales, u_zeros, u_g_idx, u_stride_s, offs_n[None, :], ranks[:, None], N, R,
                            U_BITS, U_GROUP_SIZE, U_SYMMETRIC, U_ACT_ORDER)  # (BLOCK_R, BLOCK_N): up^T
            acc = mma(t, u.to(dtype), acc, INTERPRET)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fused_matmul(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, t: torch.Tensor | None = None,
                 up: torch.Tensor | QuantizedWeight | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight^T (+ t @ up^T) (+ bias) -> (M, N) in x's dtype; weight (N, K), t (M, r), up (N, r)."""
    x = x.contiguous()
    t = None if t is None else t.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    args, constexprs = matmul_args(x, weight, t, up, bias, y)
    m, n = y.shape
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    fused_matmul_kernel[grid](*args, **constexprs)
    return y
