"""LoRAP's activation-weighted SVD for attention (Li et al., ICML 2024).

D = diag(d_j), d_j = ||X_j||_2 the L2 norm of input channel j over the calibration tokens (sqrt of the
Gram's diagonal; zeros replaced by 1e-4); SVD(W D) = U S V^T, up = U_k S_k^(1/2), down = S_k^(1/2) V_k^T D^(-1).
A diagonal-only weighting: cheaper than whitening, blind to correlations between channels.
The FFN half of LoRAP (structured channel pruning) is in compress.prune; its ranks in compress.allocate.
"""
import torch

from compress.linalg import LowRank, balanced_svd


def factorize_awsvd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    """weight (out, in), gram (in, in) -> LowRank (only the Gram's diagonal is used)."""
    norms = gram.diagonal().double().clamp(min=0).sqrt()
    norms = torch.where(norms == 0, torch.full_like(norms, 1e-4), norms)
    up, down = balanced_svd(weight.double() * norms, rank)
    return LowRank(up=up.to(weight.dtype), down=(down / norms).to(weight.dtype))
