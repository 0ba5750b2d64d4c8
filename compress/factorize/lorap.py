"""LoRAP's activation-weighted SVD for attention (Li et al., ICML 2024).

D = diag(d_j), d_j = ||X_j||_2 the L2 norm of input channel j over the calibration tokens (sqrt of the
Gram's diagonal; zeros replaced by 1e-4); SVD(W D) = U S V^T, up = U_k S_k^(1/2), down = S_k^(1/2) V_k^T D^(-1).
A diagonal-only weighting: cheaper than whitening, blind to correlations between channels.
The FFN half of LoRAP (structured channel pruning) is in compress.prune; its ranks in compress.allocate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration import Statistics
from compress.factorize import Factorization, FactorizeConfig
from compress.linalg import LowRank, balanced_svd


@dataclass(frozen=True)
class LoRAP(FactorizeConfig):
    """LoRAP: activation-weighted SVD for attention with ranks split 3:1 between v/o and q/k, and structured
    channel pruning of the MLP, both at `rank_budget`. Its allocation is its own (allocate: lorap)."""

    allocate: str = "lorap"

    @classmethod
    def allocators(cls) -> tuple[str, ...]:
        return ("lorap",)


def factorize_awsvd(weight: torch.Tensor, statistics: Statistics, rank: int, config: LoRAP) -> Factorization:
    """weight (out, in), statistics.gram (in, in) -> Factorization (only the Gram's diagonal is used)."""
    return Factorization(activation_weighted_svd(weight, statistics.gram, rank))


def activation_weighted_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    """weight (out, in), gram (in, in) -> LowRank with D = sqrt(diag gram)."""
    norms = gram.diagonal().double().clamp(min=0).sqrt()
    norms = torch.where(norms == 0, torch.full_like(norms, 1e-4), norms)
    up, down = balanced_svd(weight.double() * norms, rank)
    return LowRank(up=up.to(weight.dtype), down=(down / norms).to(weight.dtype))
