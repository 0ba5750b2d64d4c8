"""LoRAP's FFN structured channel pruning (Li et al. 2024): score intermediate channels, drop whole ones."""
from __future__ import annotations

import math

import torch


def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   input_norm: torch.Tensor, inter_norm: torch.Tensor) -> torch.Tensor:
    """(I,) importance: row norms of |gate| ||X_j|| and |up| ||X_j|| plus column norms of |down| ||Z_j|| (Wanda scores).

    gate, up (I, h); down (h, I); input_norm (h,) the L2 norms of the MLP input channels over the calibration
    tokens; inter_norm (I,) the same for down_proj's input channels.
    """
    x, z = input_norm.detach().float()[None, :], inter_norm.detach().float()[None, :]
    gate_score = (gate.detach().float().abs() * x).norm(dim=1)
    up_score = (up.detach().float().abs() * x).norm(dim=1)
    down_score = (down.detach().float().abs() * z).norm(dim=0)
    return gate_score + up_score + down_score


def channels_to_keep(scores: torch.Tensor, prune_fraction: float, protect_fraction: float = 0.01) -> torch.Tensor:
    """Sorted indices of the kept channels: the lowest floor(protect * I) are protected, the next
    floor(prune * I) pruned.

    At least one channel always remains; if protected + pruned exceed I, the pruned count wins and fewer are
    protected (the authors' slice would silently prune fewer instead).
    """
    if not 0 <= prune_fraction < 1 or not 0 <= protect_fraction < 1:
        raise ValueError(f"fractions must be in [0, 1), got prune {prune_fraction}, protect {protect_fraction}")
    size = len(scores)
    n_prune = min(math.floor(prune_fraction * size + 1e-9), size - 1)
    n_protect = min(math.floor(protect_fraction * size + 1e-9), size - n_prune)
    order = torch.sort(scores, stable=True).indices
    pruned = order[n_protect:n_protect + n_prune]
    mask = torch.ones(size, dtype=torch.bool, device=scores.device)
    mask[pruned] = False
    return mask.nonzero().squeeze(1)


def prune_mlp_weights(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                      keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept rows of gate and up (I, h) and the kept columns of down (h, I)."""
    return gate[keep], up[keep], down[:, keep]
