"""Low-rank compensation of the quantization error E = W - W_hat: W ~= base + up @ down, one module per method.

Every method is a function (error (out, in), statistics of the layer's inputs, config) -> LowRank.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.errors import CompressError
from kernels.grid import SUPPORTED_BITS


@dataclass(frozen=True)
class CompensateConfig:
    """Factors of `rank` (clipped to the layer's shape); factor_bits: quantize up and down per output channel
    (None: fp16). 4 by default: at rank 64 fp16 factors cost more bits than they buy back (evaluations/bench_real)."""

    rank: int = 64
    factor_bits: int | None = 4

    def __post_init__(self):
        if self.rank < 1:
            raise CompressError(f"compensation rank must be >= 1, got {self.rank}")
        if self.factor_bits is not None and self.factor_bits not in SUPPORTED_BITS:
            raise CompressError(f"factor bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, "
                                f"got {self.factor_bits}")
