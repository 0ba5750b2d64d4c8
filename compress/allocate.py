"""Rank allocators: per-layer ranks whose factors hold a given share of the layers' dense parameters."""
from __future__ import annotations


def rank_for_budget(out_features: int, in_features: int, budget: float) -> int:
    """The largest rank r with r * (out + in) <= budget * out * in (at least 1)."""
    return max(1, int(budget * out_features * in_features // (out_features + in_features)))


def uniform_ranks(shapes: dict[str, tuple[int, int]], budget: float) -> dict[str, int]:
    """Every layer keeps the same share `budget` of its own parameters. shapes: {name: (out, in)}."""
    return {name: rank_for_budget(out, inp, budget) for name, (out, inp) in shapes.items()}
