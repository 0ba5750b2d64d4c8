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
    with equilibrated_(statistics.gram) as scale:  # a float32 Gram's channels brought to one scale (D = 1 for float64)
        root, damp = damped_cholesky(statistics.gram)
    scaled = weight.to(root.dtype) * scale
    whitened = scaled @ root
    del root  # an (in, in) matrix: 1.5 GiB for an 8B down_proj in float64, not needed for the SVD
    lowrank = whitened_lowrank(scaled, whitened, rank)  # of T D: its `down` divided by D is T's
    return Factorization(LowRank(lowrank.up.to(weight.dtype), (lowrank.down / scale).to(weight.dtype)), damp=damp)
