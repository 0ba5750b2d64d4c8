"""SVD-LLM's truncation-aware data whitening (Wang et al., ICLR 2025), the training-free part.

With S the Cholesky factor of the input Gram X X^T, SVD(W S) = U Sigma V^T and
W' = U_r Sigma_r V_r^T S^(-1): dropping singular value sigma_i costs exactly sigma_i in
||(W - W') X||_F, so truncation keeps the output-optimal rank-r approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration import Statistics
from compress.factorize import Factorization, FactorizeConfig
from compress.linalg import LowRank, damped_cholesky, equilibrated_, whitened_lowrank


@dataclass(frozen=True)
class SVDLLM(FactorizeConfig):
    """SVD-LLM's truncation-aware whitening by the Cholesky factor of each layer's input Gram."""


def factorize_svd_llm(weight: torch.Tensor, statistics: Statistics, rank: int, config: SVDLLM) -> Factorization:
    """weight (out, in), statistics.gram (in, in) -> Factorization (with the damping the Cholesky factor needed)."""
    lowrank, damp = svd_llm_lowrank(weight, statistics.gram, rank)
    return Factorization(lowrank, damp=damp)


def svd_llm_lowrank(target: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[LowRank, float]:
    """The rank-r M minimising ||(T - M) X||_F through the Cholesky factor L of the damped Gram: U_r U_r^T T with U
    from the SVD of T L; and the damping. A float32 Gram's channels are first scaled to unit energy, G = D G' D (exact,
    undone; D = 1 for float64), and T D L' = T R with R = D L' scaled in place: no scaled copy of T."""
    with equilibrated_(gram) as scale:
        root, damp = damped_cholesky(gram)
    if gram.dtype == torch.float32:  # D = 1 otherwise: no pass over an (in, in) float64 factor for nothing
        root.mul_(scale[:, None])
    whitened = target.to(root.dtype) @ root
    del root  # an (in, in) matrix: 1.5 GiB for an 8B down_proj in float64, not needed for the SVD
    return whitened_lowrank(target, whitened, rank), damp
