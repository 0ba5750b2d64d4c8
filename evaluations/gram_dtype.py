"""Float32 against float64 input statistics on a real model, with the noise floor of the measurement beside it.

    python -m evaluations.gram_dtype                                   # all six runs, one after another
    python -m evaluations.gram_dtype --runs float64:8,float32:8 &      # or split over processes, one thread each
    python -m evaluations.gram_dtype --runs float64:4,float32:4 &

GPTQ W3 g128 (the project's default GPTQ: act-order, static groups, MSE clip) on SmolLM2-135M-Instruct, calibrated on
linux-doc's calibration split (8 x 512 tokens), scored on its evaluation split. Each run is `DTYPE:BATCH`: the Grams
kept in DTYPE and summed BATCH windows per GEMM. With 8 windows, BATCH 8, 4, 2 sum the same tokens in 1, 2 or 4
products: only the order of the float sums changes, which is the noise floor against which float32's difference
from float64 is to be read (at W3 a rounding decision that flips on a Gram's last bit cascades through GPTQ's
updates). The table gives perplexity, the mean relative layer output error ||(W - Q) X|| / ||W X|| over all layers
(the quantity GPTQ minimises, as the report measures it from the layer's Gram) and the last block's output error.
Results: evaluations/results/gram_dtype/results.json and table.md (rows of several processes are merged).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

import compress.pipeline as pipeline
from calibration import group_statistics, load_text, sample_windows
from compress.models import load_model
from compress.quantize.gptq import GPTQ
from compress.recipe import Calibration, Recipe
from evaluations.perplexity import perplexity

RUNS = ["float64:8", "float64:4", "float64:2", "float32:8", "float32:4", "float32:2"]
OUT = Path(__file__).parent / "results" / "gram_dtype"


def run(spec: str, directory: str, calib_ids: torch.Tensor, eval_ids: torch.Tensor, seqlen: int) -> dict:
    dtype, batch = spec.split(":")
    # the capture's windows per GEMM: the same tokens, summed in another order
    pipeline.group_statistics = partial(group_statistics, batch_size=int(batch))
    model, tokenizer, _ = load_model(directory)
    recipe = Recipe(quantize=GPTQ(bits=3, group_size=128), gram_dtype=dtype,
                    calibration=Calibration(nsamples=len(calib_ids), seqlen=seqlen))
    started = time.time()
    result = pipeline.compress_model(model, recipe, calib=calib_ids, tokenizer=tokenizer, progress=False)
    seconds = time.time() - started
    layers = result.report["layers"].values()
    return {"run": spec, "gram_dtype": dtype, "windows_per_gemm": int(batch),
            "perplexity": perplexity(result.model, eval_ids, seqlen, progress=False),
            "mean_layer_error": statistics.fmean(entry["relative_error"] for entry in layers),
            "last_block_error": result.report["block_output_error"][-1], "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| Gram | windows per GEMM | perplexity | mean layer output error | last block's output error |",
             "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (row["gram_dtype"] == "float32", -row["windows_per_gemm"])):
        lines.append(f"| {row['gram_dtype']} | {row['windows_per_gemm']} | {row['perplexity']:.3f} | "
                     f"{row['mean_layer_error']:.6f} | {row['last_block_error']:.4f} |")
    for dtype in ("float64", "float32"):
        mine = [row for row in rows if row["gram_dtype"] == dtype]
        if mine:
            ppl, error = [row["perplexity"] for row in mine], [row["mean_layer_error"] for row in mine]
            lines.append(f"\n{dtype}: perplexity mean {statistics.fmean(ppl):.3f} (range {min(ppl):.3f} to "
                         f"{max(ppl):.3f}), mean layer error {statistics.fmean(error):.6f} over {len(mine)} run(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="DTYPE:WINDOWS_PER_GEMM, comma-separated")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    specs = args.runs.split(",")
    if any(spec.split(":")[0] not in ("float64", "float32") or not spec.split(":")[-1].isdigit() for spec in specs):
        print(f"error: runs are DTYPE:WINDOWS with DTYPE float64 or float32, got {args.runs}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    from evaluations.real_model import cache_root, linux_doc_texts, smollm2_directory

    directory = str(smollm2_directory())
    calibration, evaluation = linux_doc_texts(cache_root() / "linux-doc")
    _, tokenizer, _ = load_model(directory)
    calib_ids = sample_windows(tokenizer, load_text(str(calibration)), args.nsamples, args.seqlen, 0)
    eval_ids = torch.tensor(tokenizer(load_text(str(evaluation)), add_special_tokens=False)["input_ids"])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    for spec in specs:
        row = run(spec, directory, calib_ids, eval_ids, args.seqlen)
        print(json.dumps(row), flush=True)
        rows = {r["run"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}  # other processes' too
        rows[spec] = row
        path.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
        (args.out / "table.md").write_text(table(list(rows.values())) + "\n")
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
