"""Quantizer x compensation benchmark on the demo model: RTN / GPTQ / LRQ / CBQ at W4 g128, W3 g128 and
W2 g64, each alone and with LoRC and EoRA at ranks 16 and 64, plus the `--rank-budget 0.5 --wbits 4` path.

    python -m evaluations.bench_quantize                                   # everything (long on 2 cores)
    python -m evaluations.bench_quantize --methods rtn gptq --ranks 64     # a slice

Prints one table (perplexity, bits per weight, seconds), writes results.json and perplexity_vs_bits.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compress import Compensate, Factorize, Quantize, Recipe, compress_model
from compress.models import load_model
from compress.recipe import QUANTIZE_METHODS, Calibration
from evaluations.perplexity import eval_text, perplexity
from evaluations.tables import format_row, header, plot_pareto, table, write_results

WIDTHS = ((4, 128), (3, 128), (2, 64))


def run(recipe: Recipe, eval_ids: torch.Tensor) -> dict:
    model, tokenizer, _ = load_model("demo")
    start = time.time()
    result = compress_model(model, recipe, tokenizer=tokenizer, progress=False)
    seconds = time.time() - start
    return {"bits_per_weight": result.report["bits_per_weight"], "seconds": round(seconds, 1),
            "perplexity": perplexity(result.model, eval_ids, model.config.max_position_embeddings, progress=False)}


def recipes(methods, widths, ranks, nsamples, iterations):
    """(label, series, recipe) for every configuration of the benchmark."""
    calibration = Calibration(nsamples=nsamples)
    for method in methods:
        for bits, group_size in widths:
            quantize = Quantize(method, bits, group_size, iterations=iterations)
            series = f"{method}"
            yield f"{method} w{bits}g{group_size}", series, Recipe(quantize=quantize, calibration=calibration)
            for compensation in ("lorc", "eora"):
                for rank in ranks:
                    yield (f"{method} w{bits}g{group_size} + {compensation}{rank}", f"{method} + {compensation}{rank}",
                           Recipe(quantize=quantize, compensate=Compensate(compensation, rank),
                                  calibration=calibration))
    for method in methods:
        if method in ("rtn", "gptq"):  # the learned quantizers work on whole blocks, not on factors
            yield (f"svd-llm r0.5 + {method} w4g128", "low rank then quantize",
                   Recipe(factorize=Factorize("svd-llm", 0.5), quantize=Quantize(method, 4, 128),
                          calibration=calibration))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(QUANTIZE_METHODS), choices=QUANTIZE_METHODS)
    parser.add_argument("--widths", nargs="+", default=[f"{b}:{g}" for b, g in WIDTHS], help="bits:group_size")
    parser.add_argument("--ranks", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=100, help="LRQ / CBQ optimisation steps per block or window")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens scored (0: all)")
    parser.add_argument("--out", type=Path, default=Path("bench_quantize"))
    args = parser.parse_args()
    widths = [tuple(int(x) for x in w.split(":")) for w in args.widths]
    _, tokenizer, _ = load_model("demo")
    ids = torch.tensor(tokenizer(eval_text("demo"), add_special_tokens=False, verbose=False)["input_ids"])
    eval_ids = ids[: args.eval_tokens] if args.eval_tokens else ids
    model, _, _ = load_model("demo")
    rows = [{"method": "original", "series": "original", "bits_per_weight": 16.0, "seconds": 0.0,
             "perplexity": perplexity(model, eval_ids, model.config.max_position_embeddings, progress=False)}]
    print(header())
    print(format_row(rows[0]), flush=True)
    for label, series, recipe in recipes(args.methods, widths, args.ranks, args.nsamples, args.iterations):
        rows.append({"method": label, "series": series, **run(recipe, eval_ids)})
        print(format_row(rows[-1]), flush=True)
    write_results({"table": rows, "eval_tokens": len(eval_ids), "nsamples": args.nsamples,
                   "iterations": args.iterations, "threads": torch.get_num_threads()}, args.out)
    plot_pareto(rows, args.out / "perplexity_vs_bits.png", "series", "demo model: quantization and compensation")
    print("\n" + table(rows))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'perplexity_vs_bits.png'}")


if __name__ == "__main__":
    main()
