"""EoRA's eigenspace low-rank approximation (Liu et al., arXiv 2410.21271), the training-free part.

With eigh(X X^T) = Q Lambda Q^T and Q' = Q Lambda^(1/2), SVD(T Q') = U' S' V'^T gives
B = U'_r S'_r^(1/2), A = S'_r^(1/2) V'_r^T Q'^(+): the rank-r M minimising ||(T - M) X||_F. The
target T is the weight W (plain factorization, same optimum as SVD-LLM) or the compression error
W - W_hat (EoRA's compensation: y = W_hat x + B (A x)); the same function serves both.
"""
import torch

from compress.linalg import LowRank, balanced_svd, eigen_root


def factorize_eora(target: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    """target (out, in) = W or W - W_hat, gram (in, in) -> LowRank(up = B (out, rank), down = A (rank, in))."""
    root, inverse_lambda = eigen_root(gram)
    up, down = balanced_svd(target.double() @ root, rank)
    down = (down * inverse_lambda) @ root.T  # A Q'^+ with Q'^+ = Lambda^(-1/2) Q^T = Lambda^-1 Q'^T
    return LowRank(up=up.to(target.dtype), down=down.to(target.dtype))
