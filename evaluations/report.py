"""Several compressed outputs side by side: a markdown table, the rows as JSON, and a Pareto plot against size.

A row comes from an output directory (its report.json and recipe, and eval.json when `compress eval --json` wrote
one there) or from an eval JSON file of a plain model (the original, counted at its 16 stored bits).
"""
from __future__ import annotations

import json
from pathlib import Path

from compress.errors import CompressError
from compress.formats.native import atomic_directory
from evaluations.tables import table

ORIGINAL_BITS = 16.0
EVAL = "eval.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CompressError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CompressError(f"cannot read {path}: {exc}") from None


def describe(recipe: dict) -> str:
    """A recipe in a few words: 'svd-llm r0.5 + gptq w4 g128 sym + eora r16'."""
    parts = []
    if recipe.get("factorize"):
        stage = recipe["factorize"]
        allocate = "" if stage["allocate"] == "uniform" else f" {stage['allocate']}"
        parts.append(f"{stage['method']} r{stage['rank_budget']:g}{allocate}")
    if recipe.get("quantize"):
        stage = recipe["quantize"]
        flags = (" sym" if stage["symmetric"] else "") + (" act-order" if stage.get("act_order") else "")
        parts.append(f"{stage['method']} w{stage['bits']} g{stage['group_size']}{flags}")
    if recipe.get("compensate"):
        stage = recipe["compensate"]
        bits = f" w{stage['factor_bits']}" if stage.get("factor_bits") else ""
        parts.append(f"{stage['method']} r{stage['rank']}{bits}")
    return " + ".join(parts) or "none"


def eval_fields(result: dict) -> dict:
    """perplexity (+ its source) and task metrics from a `compress eval --json` result."""
    fields = {"tasks": {task: {k: v for k, v in metrics.items() if k in ("acc", "acc_stderr", "acc_norm")}
                        for task, metrics in result.get("tasks", {}).items()}}
    if "perplexity" in result:
        fields.update(perplexity=result["perplexity"], ppl_source=f"{result['source']}, seqlen {result['seqlen']}")
    return fields


def output_row(path: Path) -> dict:
    """One row of the table from an output directory or a plain model's eval JSON."""
    if path.is_file():
        result = read_json(path)
        return {"name": Path(str(result.get("model", path.stem))).name or path.stem, "recipe": "original",
                "bits_per_weight": ORIGINAL_BITS, "perplexity": None, "ppl_source": None, **eval_fields(result)}
    report = read_json(path / "report.json")
    recipe = read_json(path / "compression_config.json").get("recipe", {})
    row = {"name": path.name, "recipe": describe(recipe), "bits_per_weight": report["bits_per_weight"],
           "perplexity": None, "ppl_source": None, "tasks": {}}
    if "perplexity" in report:
        ppl = report["perplexity"]
        row.update(perplexity=ppl["compressed"], ppl_source=f"{ppl['source']}, seqlen {ppl['seqlen']}")
    if (path / EVAL).is_file():
        row.update(eval_fields(read_json(path / EVAL)))
    return row


def collect_rows(paths: list[Path]) -> list[dict]:
    """Rows of every path, sorted by bits per weight (largest first)."""
    return sorted((output_row(Path(path)) for path in paths), key=lambda row: -row["bits_per_weight"])


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points (bits, quality) no other point beats on both size and quality, by increasing bits."""
    front, best = [], None
    for bits, value in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (value > best if higher_is_better else value < best):
            front.append((bits, value))
            best = value
    return front


def markdown(rows: list[dict]) -> str:
    """The side-by-side table: bits per weight, perplexity, and acc / acc_norm of every task any row has."""
    tasks = sorted({task for row in rows for task in row["tasks"]})
    columns = [("name", "{}"), ("recipe", "{}"), ("bits/weight", "{}"), ("perplexity", "{}")]
    columns += [(f"{task} {metric}", "{}") for task in tasks for metric in ("acc", "acc_norm")]
    cells = []
    for row in rows:
        cell = {"name": row["name"], "recipe": row["recipe"], "bits/weight": f"{row['bits_per_weight']:.3f}",
                "perplexity": "–" if row["perplexity"] is None else f"{row['perplexity']:.3f}"}
        for task in tasks:
            metrics = row["tasks"].get(task, {})
            cell[f"{task} acc"] = (f"{metrics['acc']:.3f} ± {metrics.get('acc_stderr', 0):.3f}" if "acc" in metrics
                                   else "–")
            cell[f"{task} acc_norm"] = f"{metrics['acc_norm']:.3f}" if "acc_norm" in metrics else "–"
        cells.append(cell)
    sources = sorted({row["ppl_source"] for row in rows if row["ppl_source"]})
    notes = [f"perplexity: {source}" for source in sources]
    notes.append("bits/weight: every stored bit of the compressed layers (ints, scales, zeros, factors) over their "
                 "parameter count; the original at 16")
    return table(cells, columns) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def plot_report(rows: list[dict], path: Path, title: str = "compressed variants") -> Path:
    """Perplexity (and each task's accuracy) against bits per weight, points labelled, Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for row in rows for task in row["tasks"] if "acc" in row["tasks"][task]})
    panels = ([None] if any(row["perplexity"] for row in rows) else []) + tasks
    if not panels:
        raise CompressError("nothing to plot: no output has a perplexity or a task accuracy")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, task in zip(axes[0], panels):
        value = (lambda r: r["perplexity"]) if task is None else (lambda r, t=task: r["tasks"].get(t, {}).get("acc"))
        error = (lambda r: 0.0) if task is None else (lambda r, t=task: r["tasks"][t].get("acc_stderr", 0.0))
        for row in rows:
            if row["recipe"] == "original" and value(row) is not None:
                ax.axhline(value(row), color="black", linestyle="--", label=f"{row['name']} (original, 16 bit)")
        points = sorted((row["bits_per_weight"], value(row), error(row), row["name"]) for row in rows
                        if value(row) is not None and row["recipe"] != "original")
        for i, (bits, y, err, name) in enumerate(points):  # labels alternate above / below so neighbours stay legible
            ax.errorbar(bits, y, yerr=err or None, fmt="o", color="tab:blue", capsize=3, zorder=3)
            ax.annotate(name, (bits, y), textcoords="offset points", xytext=(5, 6 if i % 2 == 0 else -12), fontsize=7)
        if points:
            front = pareto_front([(b, y) for b, y, _, _ in points], higher_is_better=task is not None)
            ax.step(*zip(*front), where="post", color="tab:orange", alpha=0.7, label="Pareto front")
        if task is None:
            values = [y for _, y, _, _ in points]
            if values and max(values) / min(values) > 3:
                ax.set_yscale("log")
            ax.set_ylabel("perplexity (lower is better)")
        else:
            ax.set_ylabel(f"{task} accuracy ± stderr (higher is better)")
        ax.set_xlabel("bits per weight (compressed layers, all stored bits)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: list[dict], out: Path, overwrite: bool = False) -> dict[str, Path]:
    """report.md, report.json and pareto.png in `out` (written atomically); returns their final paths."""
    with atomic_directory(Path(out), overwrite) as tmp:
        (tmp / "report.md").write_text(markdown(rows))
        (tmp / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot_report(rows, tmp / "pareto.png")
    return {"table": out / "report.md", "json": out / "report.json", "plot": out / "pareto.png"}
