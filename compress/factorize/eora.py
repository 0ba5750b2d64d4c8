"""EoRA's eigenspace low-rank approximation (Liu et al., arXiv 2410.21271), the training-free part.

With eigh(X X^T) = Q Lambda Q^T and Q' = Q Lambda^(1/2), SVD(T Q') = U' S' V'^T gives
B = U'_r S'_r^(1/2), A = S'_r^(1/2) V'_r^T Q'^(+): the rank-r M minimising ||(T - M) X||_F. The
target T is the weight W (plain factorization, same optimum as SVD-LLM) or the compression error
W - W_hat (EoRA's compensation: y = W_hat x + B (A x)); the same function serves both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from calibration import Statistics
from compress.factorize import Factorization, FactorizeConfig
from compress.factorize.svd_llm import svd_llm_lowrank
from compress.linalg import LowRank, balanced_factors, eigen_root, top_left_singular


@dataclass(frozen=True)
class EoRAFactorize(FactorizeConfig):
    """Each weight projected into the eigenspace of its input Gram and truncated there (the same optimum as
    SVD-LLM, reached through an eigendecomposition instead of a Cholesky factor)."""


def factorize_eora(weight: torch.Tensor, statistics: Statistics, rank: int, config: EoRAFactorize) -> Factorization:
    """weight (out, in), statistics.gram (in, in) -> the rank-`rank` M minimising ||(W - M) X||_F."""
    return Factorization(eigenspace_lowrank(weight, statistics.gram, rank))


def eigenspace_lowrank(target: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    """target (out, in) = W or W - W_hat, gram (in, in) -> LowRank(up = B (out, rank), down = A (rank, in))."""
    if gram.dtype == torch.float32:
        return wide_lowrank(target, gram, rank)
    root, inverse_lambda = eigen_root(gram)
    # target.double() only as temporaries: an 8B down_proj's is 0.45 GiB, next to two (in, in) float64 matrices
    U, S = top_left_singular(target.double() @ root, rank)
    # S'_r^(1/2) V'_r^T = S'_r^(-1/2) U'_r^T T Q' (as S' V'^T = U'^T T Q'), then A = that times Q'^+ = Lambda^-1 Q'^T
    up, down = balanced_factors(U, S, ((U.T @ target.double()) @ root * inverse_lambda) @ root.T)
    return LowRank(up=up.to(target.dtype), down=down.to(target.dtype), directions=int((inverse_lambda > 0).sum()))


def wide_lowrank(target: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    """The same optimum for a Gram kept in float32 (a layer too wide for float64, compress.linalg.gram_dtypes).

    The rank-r M minimising ||(T - M) X||_F is U_r U_r^T T with U from the SVD of T R, for any root R R^T = G: here
    the Cholesky factor of the channel-equilibrated, minimally damped Gram (SVD-LLM's solve), not eigh. In float32
    eigh's pseudo-inverse divided the eigenvectors' rounding by eigenvalues near the cutoff, and the quantized
    factors of SmolLM2's attention layers blew up (perplexity 9.6e6); and for a 70B down_proj (28672 wide) eigh
    costs about ten times the Cholesky factorization. Directions are not counted (None)."""
    lowrank, _ = svd_llm_lowrank(target, gram, rank)
    return lowrank
