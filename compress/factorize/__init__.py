"""Low-rank factorizations W ~= up @ down: one module per method, each with its frozen config beside it.

Every method is a function (weight (out, in), statistics of its inputs, rank, config) -> Factorization.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.errors import CompressError
from compress.linalg import LowRank

ALLOCATORS = ("uniform", "welore")


@dataclass(frozen=True)
class FactorizeConfig:
    """The targeted layers together keep `rank_budget` of their dense parameters in factors, spread over the
    layers by `allocate`: uniform (same share per layer) or welore (from each weight's singular-value spectrum;
    layers whose factors would not save parameters stay dense)."""

    rank_budget: float = 0.5
    allocate: str = "uniform"

    def __post_init__(self):
        if not 0 < self.rank_budget <= 1:
            raise CompressError(f"rank budget must be in (0, 1], got {self.rank_budget}")
        if self.allocate not in self.allocators():
            raise CompressError(f"unknown allocator '{self.allocate}' for {type(self).__name__} "
                                f"(choose from {', '.join(self.allocators())})")

    @classmethod
    def allocators(cls) -> tuple[str, ...]:
        return ALLOCATORS


@dataclass(frozen=True)
class Factorization:
    """A factorization's result, and what it chose for the report: the damping its Cholesky factor needed,
    SAES-SVD's beta."""

    lowrank: LowRank
    damp: float | None = None
    beta: float | None = None

    def details(self) -> dict:
        return {key: value for key, value in (("damp", self.damp), ("beta", self.beta)) if value is not None}
