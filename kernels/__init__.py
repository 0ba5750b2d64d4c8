"""Matmul kernels for the compressed layer `W ~= base + up @ down`, and the one point that picks which runs.

Only the pure-torch reference exists so far; the fused Triton kernels will plug into `lowrank_linear`.
"""
from kernels.grid import QuantizedWeight
from kernels.reference import lowrank_linear_reference

__all__ = ["QuantizedWeight", "lowrank_linear"]


def lowrank_linear(x, base, up, down, bias=None):
    """Dispatch point for `x @ (base + up @ down)^T + bias` (see kernels.reference for shapes)."""
    return lowrank_linear_reference(x, base, up, down, bias)
