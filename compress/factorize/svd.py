"""Plain truncated SVD: the best rank-r approximation of W in Frobenius norm, blind to the data."""
import torch

from compress.linalg import LowRank, balanced_svd


def factorize_svd(weight: torch.Tensor, rank: int) -> LowRank:
    """weight (out, in) -> LowRank with up = U_r S_r^(1/2), down = S_r^(1/2) V_r^T."""
    up, down = balanced_svd(weight.double(), rank)
    return LowRank(up=up.to(weight.dtype), down=down.to(weight.dtype))
