"""True-sequential statistics against all-at-once capture: perplexity of the same recipes both ways, one run.

    python -m evaluations.bench_true_sequential                                  # the demo model, its own texts
    python -m evaluations.real_model       # SmolLM2-135M-Instruct and linux-doc-6.1's texts, in ~/.cache/compress
    python -m evaluations.bench_true_sequential --model ~/.cache/compress/smollm2-135m-instruct \
        --calib ~/.cache/compress/linux-doc/calibration.txt --eval ~/.cache/compress/linux-doc/evaluation.txt \
        --nsamples 16 --seqlen 512 --recipes gptq-w3-g64,svd-llm-0.6

Writes results.json and table.md under --out (default evaluations/results/true_sequential/<model name>).
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from compress import GPTQ, SVDLLM, Calibration, Recipe, compress_model
from compress.models import load_model
from evaluations.perplexity import text_perplexity

RECIPES = {
    "gptq-w3-g128": dict(quantize=GPTQ(bits=3, group_size=128)),
    "gptq-w3-g64": dict(quantize=GPTQ(bits=3, group_size=64)),
    "svd-llm-0.6": dict(factorize=SVDLLM(rank_budget=0.6)),
}


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    return result.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--calib", help="calibration text (default: the recipe's, i.e. the bundled corpus)")
    parser.add_argument("--eval", default="demo", help="evaluation text (default: the demo's held-out text)")
    parser.add_argument("--nsamples", type=int, default=Calibration.nsamples)
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / "true_sequential" / Path(args.model).name
    out.mkdir(parents=True, exist_ok=True)
    calibration = Calibration(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
    model, tokenizer, _ = load_model(args.model)
    rows = [{"recipe": "original", "true_sequential": None, "bits_per_weight": 16.0, "seconds": 0.0,
             "perplexity": text_perplexity(model, tokenizer, args.eval, seqlen=args.seqlen)["perplexity"]}]
    del model
    for name in args.recipes.split(","):
        for true_sequential in (False, True):
            model, tokenizer, _ = load_model(args.model)
            recipe = Recipe(**RECIPES[name], calibration=calibration, true_sequential=true_sequential)
            result = compress_model(model, recipe, tokenizer=tokenizer)
            ppl = text_perplexity(result.model, tokenizer, args.eval, seqlen=args.seqlen)["perplexity"]
            rows.append({"recipe": name, "true_sequential": true_sequential, "perplexity": ppl,
                         "bits_per_weight": result.report["bits_per_weight"], "seconds": result.report["seconds"]})
            print(json.dumps(rows[-1]), flush=True)
    record = {"model": args.model, "calib": args.calib, "eval": args.eval, "nsamples": args.nsamples,
              "seqlen": args.seqlen, "commit": commit(), "rows": rows}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| recipe | true-sequential | bits/weight | perplexity | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {'' if r['true_sequential'] is None else ('yes' if r['true_sequential'] else 'no')} "
              f"| {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['seconds']:.1f} |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
