"""Factorization x allocator benchmark on the demo model: perplexity, bits per weight and seconds at several
rank budgets, with and without 4-bit factors; then seconds per layer against hidden size on random layers.

    python -m evaluations.bench_factorize                       # the full table (several minutes on 2 cores)
    python -m evaluations.bench_factorize --methods svd svd-llm --allocators uniform --budgets 0.8 0.5

Writes the table as JSON and a PNG of perplexity against bits per weight (--out, default bench_factorize/).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compress import Factorize, Quantize, Recipe, compress_model
from compress.allocate import rank_for_budget
from compress.models import load_model
from compress.pipeline import factorize
from compress.recipe import Calibration
from evaluations.perplexity import eval_text, perplexity
from evaluations.tables import format_row, header, plot_pareto, table, write_results

METHODS = ("svd", "svd-llm", "saes-svd", "eora", "lorap")
ALLOCATORS = ("uniform", "welore")


def combinations(methods, allocators):
    for method in methods:
        for allocate in (("lorap",) if method == "lorap" else allocators):
            yield method, allocate


def quality_table(methods, allocators, budgets, wbits_options, nsamples, eval_ids) -> list[dict]:
    model, tokenizer, _ = load_model("demo")
    seqlen = model.config.max_position_embeddings
    rows = [{"method": "original", "allocate": "-", "rank_budget": 1.0, "wbits": 16, "bits_per_weight": 16.0,
             "perplexity": perplexity(model, eval_ids, seqlen, progress=False), "seconds": 0.0}]
    print(header(COLUMNS))
    print(format_row(rows[0], COLUMNS), flush=True)
    for budget in budgets:
        for method, allocate in combinations(methods, allocators):
            for wbits in wbits_options:
                recipe = Recipe(factorize=Factorize(method, budget, allocate=allocate),
                                quantize=Quantize(bits=wbits) if wbits < 16 else None,
                                calibration=Calibration(nsamples=nsamples))
                model, tokenizer, _ = load_model("demo")
                start = time.time()
                result = compress_model(model, recipe, tokenizer=tokenizer, progress=False)
                seconds = time.time() - start
                rows.append({"method": method, "allocate": allocate, "rank_budget": budget, "wbits": wbits,
                             "bits_per_weight": result.report["bits_per_weight"],
                             "perplexity": perplexity(result.model, eval_ids, seqlen, progress=False),
                             "seconds": round(seconds, 1)})
                print(format_row(rows[-1], COLUMNS), flush=True)
    return rows


def scaling_sweep(methods, sizes, tokens_per_channel: int = 4) -> list[dict]:
    """Seconds to factorize one random square layer at budget 0.5, per method and hidden size."""
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        weight = torch.randn(size, size, generator=generator) / size**0.5
        x = torch.randn(tokens_per_channel * size, size, generator=generator, dtype=torch.float64)
        x_fp = x + 0.05 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        gram, cross = x.T @ x, (x_fp - x).T @ x
        rank = rank_for_budget(size, size, 0.5)
        for method in methods:
            stage = Factorize(method, 0.5, allocate="lorap" if method == "lorap" else "uniform")
            start = time.perf_counter()
            factorize(weight, gram, cross, rank, stage)
            rows.append({"method": method, "hidden": size, "seconds": round(time.perf_counter() - start, 4)})
        print("  ".join(f"{r['method']} {r['seconds']:.3f}s" for r in rows[-len(methods):]), f"(hidden {size})",
              flush=True)
    return rows


COLUMNS = (("method", "{:<8}"), ("allocate", "{:<8}"), ("rank_budget", "{:>6.2f}"), ("wbits", "{:>5d}"),
           ("bits_per_weight", "{:>7.3f}"), ("perplexity", "{:>10.3f}"), ("seconds", "{:>6.1f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6, 0.5, 0.4])
    parser.add_argument("--wbits", type=int, nargs="+", default=[16, 4], help="16: dense fp16 factors")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens scored (0: all)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--out", type=Path, default=Path("bench_factorize"))
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    _, tokenizer, _ = load_model("demo")
    ids = torch.tensor(tokenizer(eval_text("demo"), add_special_tokens=False, verbose=False)["input_ids"])
    eval_ids = ids[: args.eval_tokens] if args.eval_tokens else ids
    rows = quality_table(args.methods, args.allocators, args.budgets, args.wbits, args.nsamples, eval_ids)
    print("\nseconds per layer against hidden size "
          f"(random square layer, budget 0.5, {torch.get_num_threads()} threads)")
    sweep = scaling_sweep(args.methods, args.sizes) if args.sizes else []
    result = {"table": rows, "scaling": sweep, "eval_tokens": len(eval_ids), "nsamples": args.nsamples,
              "threads": torch.get_num_threads()}
    write_results(result, args.out)
    for row in rows:
        row["series"] = f"{row['method']} / {row['allocate']}" + (f" / w{row['wbits']}" if row["wbits"] < 16 else "")
    plot_pareto(rows, args.out / "perplexity_vs_bits.png", "series", "demo model: factorizations")
    print("\n" + table(rows, COLUMNS))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'perplexity_vs_bits.png'}")


if __name__ == "__main__":
    main()
