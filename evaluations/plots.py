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


def plot_forms(report: dict, path: Path) -> Path:
    """Bits per weight of every layer that `--bpw` gave a form, coloured by the form (compensated ones hatched)."""
    layers = {name: entry for name, entry in report["layers"].items() if "form" in entry}
    forms = sorted({entry["form"] for entry in layers.values()})
    colours = {form: plt.cm.tab20(i % 20) for i, form in enumerate(forms)}
    fig, ax = plt.subplots(figsize=(max(7.0, 0.06 * len(layers) + 2), 4))
    for i, entry in enumerate(layers.values()):
        ax.bar(i, entry["bits_per_weight"], width=1.0, color=colours[entry["form"]],
               hatch="//" if "+r" in entry["form"] else None, edgecolor="white", linewidth=0.2)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[form]) for form in forms]
    ax.legend(handles, forms, fontsize=7, ncol=max(1, -(-len(forms) // 16)), loc="upper left", bbox_to_anchor=(1.01, 1))
    step = max(1, len(layers) // 40)
    ax.set_xticks(range(0, len(layers), step), [n.split("layers.")[-1] for n in list(layers)[::step]], rotation=90,
                  fontsize=6)
    ax.axhline(report["bpw"]["budget"], color="black", linewidth=0.8, linestyle="--")
    ax.set_ylabel("bits per weight")
    ax.set_title(f"forms per layer: {report['bits_per_weight']:.3f} bits per weight "
                 f"(budget {report['bpw']['budget']:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
