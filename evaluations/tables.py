"""Benchmark rows (dicts) as markdown tables, JSON files and perplexity-against-size plots."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (("method", "{:<22}"), ("bits_per_weight", "{:>7.3f}"), ("perplexity", "{:>10.3f}"), ("seconds", "{:>7.1f}"))


def header(columns=COLUMNS) -> str:
    names = [name for name, _ in columns]
    return "| " + " | ".join(names) + " |\n" + "|" + "|".join("---" for _ in names) + "|"


def format_row(row: dict, columns=COLUMNS) -> str:
    return "| " + " | ".join(fmt.format(row[name]) for name, fmt in columns) + " |"


def table(rows: list[dict], columns=COLUMNS) -> str:
    return "\n".join([header(columns)] + [format_row(row, columns) for row in rows])


def write_results(result: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot_pareto(rows: list[dict], path: Path, series: str, title: str) -> Path:
    """Perplexity against bits per weight, one line per value of row[series]; the 16-bit original as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    labels = list(dict.fromkeys(r[series] for r in rows if r["method"] != "original"))
    colors = plt.get_cmap("tab20")(range(20))
    for i, label in enumerate(labels):
        points = sorted((r["bits_per_weight"], r["perplexity"]) for r in rows if r[series] == label)
        ax.plot(*zip(*points), marker="osD^v"[i // 20 % 5], color=colors[i % 20], label=label)
    for row in rows:
        if row["method"] == "original":
            ax.axhline(row["perplexity"], color="black", linestyle="--", label="original (16 bit)")
    ax.set_xlabel("bits per weight (compressed layers, all stored bits)")
    ax.set_ylabel("perplexity (demo held-out)")
    ax.set_yscale("log")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
