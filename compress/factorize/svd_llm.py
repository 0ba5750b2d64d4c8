"""SVD-LLM's truncation-aware data whitening (Wang et al., ICLR 2025), the training-free part.

With S the Cholesky factor of the input Gram X X^T, SVD(W S) = U Sigma V^T and
W' = U_r Sigma_r V_r^T S^(-1): dropping singular value sigma_i costs exactly sigma_i in
||(W - W') X||_F, so truncation keeps the output-optimal rank-r approximation.
"""
import torch

from compress.linalg import LowRank, damped_cholesky, whitened_lowrank


def factorize_svd_llm(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[LowRank, float]:
    """weight (out, in), gram (in, in) -> (LowRank, damping that the Cholesky factor needed)."""
    root, damp = damped_cholesky(gram)
    whitened = weight.double() @ root
    del root  # an (in, in) float64 matrix: 1.5 GiB for an 8B down_proj, not needed for the SVD
    return whitened_lowrank(weight, whitened, rank), damp
