"""ZeroQuant-V2's LoRC (Yao et al., arXiv 2303.08302): the plain truncated SVD of the quantization error."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration import Statistics
from compress.compensate import CompensateConfig
from compress.factorize.svd import truncated_lowrank
from compress.linalg import LowRank


@dataclass(frozen=True)
class LoRC(CompensateConfig):
    """LoRC: the error's best rank-r approximation in Frobenius norm, blind to the data."""


def compensate_lorc(error: torch.Tensor, statistics: Statistics | None, config: LoRC) -> LowRank:
    """error (out, in) = W - W_hat -> LowRank of rank min(config.rank, out, in)."""
    return truncated_lowrank(error, min(config.rank, *error.shape))
