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
from compress.linalg import damped_cholesky, whitened_lowrank


@dataclass(frozen=True)
class SVDLLM(FactorizeConfig):
    """SVD-LLM's truncation-aware whitening by the Cholesky factor of each layer's input Gram."""


def factorize_svd_llm(weight: torch.Tensor, statistics: Statistics, rank: int, config: SVDLLM) -> Factorization:
    """weight (out, in), statistics.gram (in, in) -> Factorization (with the damping the Cholesky factor needed)."""
    root, damp = damped_cholesky(statistics.gram)
    whitened = weight.double() @ root
    del root  # an (in, in) float64 matrix: 1.5 GiB for an 8B down_proj, not needed for the SVD
    return Factorization(whitened_lowrank(weight, whitened, rank), damp=damp)
