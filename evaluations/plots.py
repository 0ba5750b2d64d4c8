"""Plots of compression reports (matplotlib, written as PNG)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_ranks(report: dict, path: Path) -> Path:
    """Bar chart of the rank kept in every compressed layer (dense layers drawn at their full rank, hatched)."""
    names = list(report["layers"])
    ranks = [entry.get("rank") or 0 for entry in report["layers"].values()]
    full = [min(entry["shape"]) for entry in report["layers"].values()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(names)), 4))
    ax.bar(range(len(names)), full, color="none", edgecolor="lightgray", hatch="//", label="full rank")
    ax.bar(range(len(names)), ranks, color="tab:blue", label="kept rank")
    ax.set_xticks(range(len(names)), [n.split("layers.")[-1] for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_title(f"rank per layer (bits per weight {report['bits_per_weight']:.2f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
