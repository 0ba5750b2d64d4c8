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
from calibration.capture import symmetrize_
from compress.factorize import Factorization, FactorizeConfig
from compress.factorize.svd_llm import svd_llm_lowrank
from compress.linalg import LowRank, balanced_factors, eigen_root, eigh_, top_left_singular


ROW_BLOCK = 4096  # rows of a target copied to float64 at a time


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
    if target.shape[0] > target.shape[1]:
        U, S = tall_top_singular(target, root, rank)
    else:  # target.double() only as a temporary: an 8B down_proj's is 0.45 GiB, beside two (in, in) float64 matrices
        U, S = top_left_singular(target.double() @ root, rank)
    # S'_r^(1/2) V'_r^T = S'_r^(-1/2) U'_r^T T Q' (as S' V'^T = U'^T T Q'), then A = that times Q'^+ = Lambda^-1 Q'^T
    projected = sum(U[rows].T @ block for rows, block in row_blocks(target))
    up, down = balanced_factors(U, S, (projected @ root * inverse_lambda) @ root.T)
    return LowRank(up=up.to(target.dtype), down=down.to(target.dtype), directions=int((inverse_lambda > 0).sum()))


def tall_top_singular(target: torch.Tensor, root: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """top_left_singular(T Q', rank) for a tall target T (out > in), from the (in, in) side: eigh of
    Q'^T (T^T T) Q' = V S^2 V^T, then U_r = T Q' V_r / S_r. T^T T is summed over blocks of T's rows in float64, so
    neither T Q' nor a float64 T (out, in) is held: for a 70B gate_proj each is 1.75 GiB, and the QR of T Q' holds
    another (top_left_singular's tall path). The top directions lose nothing to the squared condition number."""
    side = sum(block.T @ block for _, block in row_blocks(target))
    side = root.T @ side
    side = symmetrize_(side @ root)
    eigenvalues, vectors = eigh_(side)
    del side
    V, S = vectors[:, -rank:].flip(1), eigenvalues[-rank:].flip(0).clamp(min=0).sqrt()
    directions = root @ V
    U = torch.cat([block @ directions for _, block in row_blocks(target)])
    return U / torch.where(S > 0, S, 1), S


def row_blocks(target: torch.Tensor):
    """(slice, float64 copy) of each block of ROW_BLOCK rows of the target."""
    for start in range(0, len(target), ROW_BLOCK):
        yield slice(start, start + ROW_BLOCK), target[start:start + ROW_BLOCK].double()


def wide_lowrank(target: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    """The same optimum for a Gram kept in float32 (a layer too wide for float64, compress.linalg.gram_dtypes).

    The rank-r M minimising ||(T - M) X||_F is U_r U_r^T T with U from the SVD of T R, for any root R R^T = G: here
    the Cholesky factor of the channel-equilibrated, minimally damped Gram (SVD-LLM's solve), not eigh. In float32
    eigh's pseudo-inverse divided the eigenvectors' rounding by eigenvalues near the cutoff, and the quantized
    factors of SmolLM2's attention layers blew up (perplexity 9.6e6); and for a 70B down_proj (28672 wide) eigh
    costs about ten times the Cholesky factorization. Directions are not counted (None)."""
    lowrank, _ = svd_llm_lowrank(target, gram, rank)
    return lowrank
