"""Weight quantizers: one module per method, each with its frozen config beside it.

Layer quantizers (RTN, GPTQ) take one weight and its input statistics and return a `Quantization`;
learned quantizers (LRQ, CBQ, SignRound) take a window of decoder blocks and both calibration streams and return
the quantized weights of every linear in the window. All of them store the shared grid of kernels.grid.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.errors import CompressError
from kernels.grid import CLIPS, SUPPORTED_BITS, QuantizedWeight


@dataclass(frozen=True)
class GridConfig:
    """The grid every quantizer stores: `bits` per weight, one scale (and zero unless `symmetric`) per group of
    `group_size` input columns. group_size 0 means one group per row; one that does not divide a tensor falls back
    to the largest divisor below it, and the report says so. clip: how each group's range is chosen, "minmax" or
    "mse" (the shrink of the range with the least error, grid.find_params)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip: str = "mse"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise CompressError(f"wbits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size < 0:
            raise CompressError(f"group size must be >= 0 (0: one group per row), got {self.group_size}")
        if self.clip not in CLIPS:
            raise CompressError(f"clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")


@dataclass(frozen=True)
class LearnedConfig(GridConfig):
    """A quantizer learned on windows of `window` blocks (overlapping by `overlap`) from both calibration
    streams: Adam for `iterations` steps at learning rate `lr` on batches of `batch_size` windows, seeded."""

    iterations: int = 200
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0

    window = 1
    overlap = 0

    def __post_init__(self):
        super().__post_init__()
        if self.iterations < 0 or not self.lr > 0 or self.batch_size < 1:
            raise CompressError(f"need iterations >= 0, lr > 0 and batch_size >= 1, got {self.iterations}, "
                                f"{self.lr}, {self.batch_size}")


@dataclass(frozen=True)
class Quantization:
    """A layer quantizer's result: the packed weight, and for GPTQ the damping it used (and whether the
    requested one had to be raised for the Cholesky factorisations to succeed)."""

    weight: QuantizedWeight
    damp: float | None = None
    damp_raised: bool = False
