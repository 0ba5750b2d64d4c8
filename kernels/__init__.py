"""Kernels, and the points that pick which runs: Triton for CUDA tensors, the pure-torch reference (kernels.reference)
for CPU tensors.

`lowrank_linear`: the compressed layer `W ~= base + up @ down` (kernels.fused_matmul for prefill,
kernels.splitk_matmul for decode). `gptq_block`: one block of GPTQ's column loop (kernels.gptq_triton).
A caller picks a path explicitly with `kernel` (auto, reference or triton; a CompressedLinear passes its own
`kernel`); under auto, COMPRESS_KERNELS=reference forces the reference everywhere (for debugging) and
COMPRESS_KERNELS=triton the kernels, which on a CPU needs TRITON_INTERPRET=1 set before they are first used.
"""
from __future__ import annotations

import os

import torch

from kernels.grid import QuantizedWeight
from kernels.reference import Operand, gptq_block_reference, lowrank_linear_reference

__all__ = ["QuantizedWeight", "gptq_block", "lowrank_linear", "lowrank_linear_triton"]

KERNELS_ENV = "COMPRESS_KERNELS"
CHOICES = ("auto", "reference", "triton")


def use_triton(x: torch.Tensor, kernel: str = "auto") -> bool:
    """The choice of path: `kernel` when it names one, else COMPRESS_KERNELS when it names one, else Triton exactly
    for CUDA tensors."""
    if kernel not in CHOICES:
        raise ValueError(f"kernel choice must be one of {', '.join(CHOICES)}, got '{kernel}'")
    choice = os.environ.get(KERNELS_ENV, "auto") if kernel == "auto" else kernel
    if choice not in CHOICES:
        raise ValueError(f"{KERNELS_ENV} must be one of {', '.join(CHOICES)}, got '{choice}'")
    return choice == "triton" or (choice == "auto" and x.is_cuda)


def lowrank_linear(x: torch.Tensor, base: Operand, up: Operand, down: Operand,
                   bias: torch.Tensor | None = None, kernel: str = "auto") -> torch.Tensor:
    """Dispatch point for `x @ (base + up @ down)^T + bias` (see kernels.reference for shapes)."""
    if use_triton(x, kernel):
        return lowrank_linear_triton(x, base, up, down, bias)
    return lowrank_linear_reference(x, base, up, down, bias)


def lowrank_linear_triton(x: torch.Tensor, base: Operand, up: Operand, down: Operand,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """lowrank_linear_reference through the Triton kernels: t = x @ down^T once, then base's GEMM
    with t @ up^T fused in.

    Without a base the two factors run as two chained GEMMs (t, then t @ up^T + bias).
    """
    from kernels.fused_matmul import fused_matmul  # imported late: triton.jit reads TRITON_INTERPRET when it decorates
    from kernels.splitk_matmul import MAX_ROWS, splitk_matmul

    rows = x.reshape(-1, x.shape[-1])
    decode = rows.shape[0] <= MAX_ROWS
    matmul = splitk_matmul if decode else fused_matmul
    if up is None:
        y = matmul(rows, base, bias=bias)
    else:
        t = splitk_matmul(rows, down, out_dtype=torch.float32) if decode else fused_matmul(rows, down)
        y = matmul(t.to(x.dtype), up, bias=bias) if base is None else matmul(rows, base, t, up, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def gptq_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch point for one block of GPTQ's column loop (see kernels.reference.gptq_block_reference): both paths
    give the same bits."""
    if use_triton(W1):
        from kernels.gptq_triton import gptq_block_triton

        return gptq_block_triton(W1, Hinv1, scale, zero, bits)
    return gptq_block_reference(W1, Hinv1, scale, zero, bits)
