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
from compress.linalg import LowRank, balanced_factors, eigen_root, equilibrated_, top_left_singular


@dataclass(frozen=True)
class EoRAFactorize(FactorizeConfig):
    """Each weight projected into the eigenspace of its input Gram and truncated there (the same optimum as
    SVD-LLM, reached through an eigendecomposition instead of a Cholesky factor)."""


def factorize_eora(weight: torch.Tensor, statistics: Statistics, rank: int, config: EoRAFactorize) -> Factorization:
    """weight (out, in), statistics.gram (in, in) -> the rank-`rank` M minimising ||(W - M) X||_F."""
    return Factorization(eigenspace_lowrank(weight, statistics.gram, rank))


def eigenspace_lowrank(target: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    """target (out, in) = W or W - W_hat, gram (in, in) -> LowRank(up = B (out, rank), down = A (rank, in))."""
    # A float32 Gram's channels are first brought to one scale, G = D G' D (D = 1 for float64): the problem is then
    # solved for T D against G' = Q' Q'^T, and its `down` divided by D. Q' is held as R = D Q' (rows scaled in place),
    # so that T D Q' = T R needs no scaled copy of T.
    with equilibrated_(gram) as scale:
        root, inverse_lambda = eigen_root(gram)
    root.mul_(scale[:, None])  # R
    dtype, target = target.dtype, target.to(root.dtype)  # in the Gram's precision: 0.45 GiB for an 8B down_proj
    U, S = top_left_singular(target @ root, rank)
    if gram.dtype == torch.float32:
        # M = U'_r U'_r^T T, the optimum without the projection onto the Gram's range: the pseudo-inverse would divide
        # float32's rounding in the eigenvectors by eigenvalues near the cutoff, and the quantized factors of a real
        # model's attention inputs (SmolLM2) then blew up
        projected = U.T @ target
    else:
        # S'_r^(1/2) V'_r^T = S'_r^(-1/2) U'_r^T T D Q' (as S' V'^T = U'^T T D Q'), times Q'^+ = Lambda^-1 Q'^T
        # = Lambda^-1 R^T D^-1, then D^-1 once more: the `down` of T, with no part outside the inputs' span
        projected = ((U.T @ target) @ root * inverse_lambda) @ root.T / scale.square()
    up, down = balanced_factors(U, S, projected)
    return LowRank(up=up.to(dtype), down=down.to(dtype), directions=int((inverse_lambda > 0).sum()))
