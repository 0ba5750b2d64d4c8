"""EoRA (Liu et al., arXiv 2410.21271): the quantization error projected into the eigenspace of the layer's input
Gram and truncated there, so that the rank-r factors minimise ||(E - B A) X||_F (compress.factorize.eora)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration import Statistics
from compress.compensate import CompensateConfig
from compress.factorize.eora import eigenspace_lowrank
from compress.linalg import LowRank


@dataclass(frozen=True)
class EoRA(CompensateConfig):
    """EoRA: eigenspace-projected low-rank compensation of the quantization error."""


def compensate_eora(error: torch.Tensor, statistics: Statistics, config: EoRA) -> LowRank:
    """error (out, in) = W - W_hat, statistics.gram (in, in) -> LowRank of rank min(config.rank, out, in)."""
    return eigenspace_lowrank(error, statistics.gram, min(config.rank, *error.shape))
