"""Linear algebra shared by the factorizations: damped Cholesky of a Gram matrix, whitened truncated SVD."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """W ~= up @ down with up (out, rank) and down (rank, in)."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def weight(self) -> torch.Tensor:
        return self.up @ self.down


def damped_cholesky(gram: torch.Tensor, max_tries: int = 10) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of gram + damp*I (float64), L @ L.T = gram + damp*I, and the damp used.

    Tries no damping first, then 1e-8, 1e-7, ... times the mean diagonal; dead input channels
    (zero diagonal) get the mean diagonal so that they cannot make the factor singular.
    """
    gram = gram.to(torch.float64, copy=True)
    diag = gram.diagonal()
    mean_diag = diag.mean().clamp(min=1e-12).item()
    dead = diag <= 0
    diag[dead] = mean_diag
    undamped = diag.clone()
    for attempt in range(max_tries):
        damp = 0.0 if attempt == 0 else mean_diag * 10.0 ** (attempt - 9)
        diag.copy_(undamped + damp)  # on the diagonal in place: no (n, n) identity or sum beside the Gram
        factor, info = torch.linalg.cholesky_ex(gram)
        if info.item() == 0:
            return factor, damp
    raise torch.linalg.LinAlgError(f"Gram matrix is not positive definite even with damping {damp:.3g}")


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` singular triplets (U_r, S_r, Vh_r) of a float64 matrix."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def balanced_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of a float64 (m, n) matrix split evenly: (U_r S_r^(1/2) (m, r), S_r^(1/2) V_r^T (r, n))."""
    U, S, Vh = truncated_svd(matrix, rank)
    sqrt_s = S.sqrt()
    return U * sqrt_s, sqrt_s[:, None] * Vh


def whitened_lowrank(target: torch.Tensor, root: torch.Tensor, rank: int) -> LowRank:
    """argmin over rank-r M of ||(target - M) R||_F for a lower-triangular root R (R R^T = gram).

    SVD(target R) = U S V^T; up = U_r S_r^(1/2), down = S_r^(1/2) V_r^T R^(-1). With the Cholesky
    factor of the input Gram this minimises the layer output error ||(target - M) X||_F (SVD-LLM).
    """
    up, down = balanced_svd(target.double() @ root, rank)
    down = torch.linalg.solve_triangular(root, down, upper=False, left=False)
    return LowRank(up=up.to(target.dtype), down=down.to(target.dtype))


def eigen_root(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(root = Q Lambda^(1/2) (n, n), inverse_lambda (n,)) float64, from eigh(gram) = Q Lambda Q^T.

    root @ root.T = gram, and (inverse_lambda[:, None] * root.T) = Lambda^(-1/2) Q^T is root's pseudo-inverse:
    callers apply it as that product, so that only one (n, n) matrix besides the Gram is ever held.
    A truncated pseudo-inverse (as GPTQModel's EoRA): eigenvalues <= lambda_max * n * eps_fp32, negative
    ones included, count as zero, and both their square root and inverse are set to 0.
    """
    gram = gram.double()
    if not torch.isfinite(gram).all():
        raise ValueError("eigen_root: the Gram matrix has non-finite entries (NaN or inf in the calibration statistics)")
    eigenvalues, root = torch.linalg.eigh(gram)
    if not torch.isfinite(eigenvalues).all():
        raise ValueError("eigen_root: eigh of the Gram matrix returned non-finite eigenvalues")
    threshold = eigenvalues.max().clamp(min=0) * len(gram) * torch.finfo(torch.float32).eps
    kept = eigenvalues > threshold
    sqrt_lambda, inverse_lambda = torch.zeros_like(eigenvalues), torch.zeros_like(eigenvalues)
    sqrt_lambda[kept] = eigenvalues[kept].sqrt()
    inverse_lambda[kept] = 1 / eigenvalues[kept]
    return root.mul_(sqrt_lambda), inverse_lambda


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative layer output error ||(W - W') X||_F / ||W X||_F computed from the Gram X X^T."""
    weight, error = weight.double(), weight.double() - approx.double()
    gram = gram.double()
    num = torch.einsum("oi,ij,oj->", error, gram, error).clamp(min=0)
    den = torch.einsum("oi,ij,oj->", weight, gram, weight).clamp(min=1e-30)
    return (num / den).sqrt().item()
