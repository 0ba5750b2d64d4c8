"""Plain truncated SVD: the best rank-r approximation of W in Frobenius norm, blind to the data."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration import Statistics
from compress.factorize import Factorization, FactorizeConfig
from compress.linalg import LowRank, balanced_svd


@dataclass(frozen=True)
class SVD(FactorizeConfig):
    """Truncated SVD of each weight; reads no calibration statistics."""


def truncated_lowrank(weight: torch.Tensor, rank: int) -> LowRank:
    """weight (out, in) -> LowRank with up = U_r S_r^(1/2), down = S_r^(1/2) V_r^T."""
    up, down = balanced_svd(weight.double(), rank)
    return LowRank(up=up.to(weight.dtype), down=down.to(weight.dtype))


def factorize_svd(weight: torch.Tensor, statistics: Statistics | None, rank: int, config: SVD) -> Factorization:
    """weight (out, in) -> its best rank-`rank` approximation in Frobenius norm."""
    return Factorization(truncated_lowrank(weight, rank))
