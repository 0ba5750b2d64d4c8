"""SAES-SVD (Hu et al., arXiv 2602.03051): CEALC's closed form with ACES's choice of beta.

CEALC: min over rank-r A B of ||(A B - W) X||_F^2 + alpha ||A B X - W X^f||_F^2, X the compressed
stream's inputs, X^f the full-precision stream's. With H = X X^T, Delta = (X^f - X) X^T (not
symmetric) and beta = alpha / (1 + alpha), the whitened target is G = W (H + beta Delta) C^(-T) with
C C^T = H (+ damp I): truncated SVD G ~ U_r S_r V_r^T, A = U_r S_r^(1/2), B = S_r^(1/2) V_r^T C^(-1).
The ridge enters H in both places, so beta = 0 gives G = W C, exactly SVD-LLM.
ACES picks beta in [beta_min, beta_max] minimising the first-order tail-energy ratio rho(beta).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calibration import Statistics
from compress.errors import CompressError
from compress.factorize import Factorization, FactorizeConfig
from compress.linalg import LowRank, balanced_svd, damped_cholesky, truncated_svd


@dataclass(frozen=True)
class SAES(FactorizeConfig):
    """SAES-SVD: beta = alpha/(1+alpha) weighs the fit to the full-precision stream; None lets ACES choose it per
    layer in [beta_min, beta_max]. ridge: damping of the Gram's Cholesky factor, as a fraction of its mean diagonal
    (a near-singular Gram otherwise amplifies noise in the cross term's solve)."""

    beta: float | None = None
    beta_min: float = 0.25
    beta_max: float = 0.75
    ridge: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.beta is not None and not 0 <= self.beta < 1:
            raise CompressError(f"beta must be in [0, 1), got {self.beta}")
        if not 0 <= self.ridge < 1:
            raise CompressError(f"ridge must be in [0, 1), got {self.ridge}")
        if not 0 <= self.beta_min <= self.beta_max < 1:
            raise CompressError(f"need 0 <= beta_min <= beta_max < 1, got [{self.beta_min}, {self.beta_max}]")


def factorize_saes(weight: torch.Tensor, statistics: Statistics, rank: int, config: SAES) -> Factorization:
    """weight (out, in), statistics.gram H and statistics.cross Delta (in, in) -> Factorization (with the beta used
    and the damping of the Cholesky factor).

    cross = (X^f - X) X^T in column notation, i.e. (Xf - X).T @ X for row-major (tokens, in) inputs, scaled like gram.
    """
    return saes_lowrank(weight, statistics.gram, statistics.cross, rank, config.beta, config.beta_max, config.beta_min,
                        config.ridge)


def saes_lowrank(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, rank: int, beta: float | None = None,
                 beta_max: float = 0.99, beta_min: float = 0.0, ridge: float = 0.0) -> Factorization:
    """CEALC's closed form, with the beta used and the damping. beta=None chooses beta with ACES in
    [beta_min, beta_max]; a given beta is used as it is."""
    root, damp = damped_cholesky(gram, ridge=ridge)
    S = weight.to(root.dtype) @ root  # W (H + damp I) C^(-T) = W C
    D = torch.linalg.solve_triangular(root.T, weight.to(root.dtype) @ cross.to(root.dtype),
                                      upper=True, left=False)  # W Delta C^(-T)
    if beta is None:
        beta = aces_beta(S, D, rank, beta_max, beta_min)
    elif not 0.0 <= beta < 1.0:
        raise ValueError(f"beta = alpha/(1+alpha) must lie in [0, 1), got {beta}")
    up, down = balanced_svd(S + beta * D, rank)
    down = torch.linalg.solve_triangular(root, down, upper=False, left=False)
    lowrank = LowRank(up=up.to(weight.dtype), down=down.to(weight.dtype))
    return Factorization(lowrank, damp=damp, beta=float(beta))


def _complement(M: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """(I - U U^T) M (I - V V^T) for M (m, n), U (m, r), Vh (r, n), without forming the projectors."""
    UtM, MV = U.T @ M, M @ Vh.T
    return M - U @ UtM - MV @ Vh + U @ (UtM @ Vh.T) @ Vh


def aces_beta(S: torch.Tensor, D: torch.Tensor, rank: int, beta_max: float = 0.99, beta_min: float = 0.0) -> float:
    """S = W H L, D = W Delta L (out, in) -> argmin over [beta_min, beta_max] of rho(beta), the approximate tail ratio.

    rho(beta) = (a + 2 b beta + c beta^2) / (A + 2 B beta + C beta^2) with a, b, c the energies of S, D
    projected off the top-r singular subspaces of S and A, B, C those of S, D; candidates are the endpoints
    and the real stationary points.
    """
    if not 0.0 <= beta_min <= beta_max < 1.0:
        raise ValueError(f"need 0 <= beta_min <= beta_max < 1, got [{beta_min}, {beta_max}]")
    S, D = S.double(), D.double()
    U, _, Vh = truncated_svd(S, rank)
    S_perp, D_perp = _complement(S, U, Vh), _complement(D, U, Vh)
    a, b, c = (S_perp * S_perp).sum().item(), (S_perp * D_perp).sum().item(), (D_perp * D_perp).sum().item()
    A, B, C = (S * S).sum().item(), (S * D).sum().item(), (D * D).sum().item()
    if A <= 0:
        return beta_min  # W C = 0 means W = 0 (and D = 0): nothing to choose

    def rho(t: float) -> float:
        return (a + 2 * b * t + c * t * t) / max(A + 2 * B * t + C * t * t, 1e-300)

    # Real parts of all roots are candidates too: extra points in the interval never hurt the argmin.
    roots = np.roots([c * B - b * C, c * A - a * C, b * A - a * B])
    inside = sorted(float(r.real) for r in np.atleast_1d(roots) if np.isfinite(r) and beta_min < r.real < beta_max)
    best = beta_min
    for t in inside + [beta_max]:
        if rho(t) < rho(best):
            best = t
    return best
