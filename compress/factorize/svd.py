"""Plain truncated SVD: the best rank-r approximation of W in Frobenius norm, blind to the data."""
import torch

from compress.linalg import LowRank, truncated_svd


def factorize_svd(weight: torch.Tensor, rank: int) -> LowRank:
    """weight (out, in) -> LowRank with up = U_r S_r^(1/2), down = S_r^(1/2) V_r^T."""
    U, S, Vh = truncated_svd(weight.double(), rank)
    sqrt_s = S.sqrt()
    return LowRank(up=(U * sqrt_s).to(weight.dtype), down=(sqrt_s[:, None] * Vh).to(weight.dtype))
