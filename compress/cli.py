"""The `compress` command: builds a recipe from flags (or reads one), runs it, writes the output.

    compress --model demo --rank-budget 0.5 --wbits 4 --out demo-r50-w4
    compress eval DIR [--ppl demo] [--tasks python_next_line --limit 200] [--json FILE]
    compress export DIR --format gptq|compressed-tensors|gguf|dense|native|onnx --out OUT [--merge-lowrank]
    compress report DIR1 DIR2 ... --out REPORT_DIR
    compress compensate --model QUANTIZED_DIR [--original MODEL] --rank 64 [--method eora|lorc] --out OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from compress.compensate import CompensateConfig
from compress.errors import CompressError
from compress.factorize import FactorizeConfig
from compress.methods import DEFAULT_METHODS, METHODS, config_type
from compress.quantize import GridConfig, LearnedConfig
from compress.quantize.gptq import GPTAQ, GPTQ
from compress.quantize.signround import STARTS, SignRound
from compress.recipe import GRAM_DTYPE_CHOICES, Calibration, Recipe
from compress.search import count_forms
from kernels.grid import CLIPS

# Recipe flags: per stage, flag -> the field of the chosen method's config it sets. --factorize / --quantize /
# --compensate choose the method; a flag left out takes the config's own default.
STAGE_FLAGS = {
    "factorize": {"rank_budget": "rank_budget", "allocate": "allocate"},
    "quantize": {"wbits": "bits", "group_size": "group_size", "sym": "symmetric", "clip": "clip",
                 "act_order": "act_order", "static_groups": "static_groups", "damp": "damp", "alpha": "alpha",
                 "iterations": "iterations", "start": "start"},
    "compensate": {"compensate_rank": "rank", "compensate_bits": "factor_bits"},
}
BPW_QUANTIZER = "gptaq"  # the best layer quantizer measured on SmolLM2 (evaluations/results/bench_real)
CALIBRATION_FLAGS = {"calib": "source", "nsamples": "nsamples", "seqlen": "seqlen", "seed": "seed"}


def compress_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Compress a causal LM: W ~= base + up @ down.",
                                     epilog="Other commands: compress eval DIR --ppl SRC --tasks T; "
                                            "compress compensate --model DIR [--original MODEL] --out OUT; "
                                            "compress export DIR --format F --out OUT; "
                                            "compress report DIR... --out OUT")
    parser.add_argument("--model", required=True, help="alias (demo, llama-3-8b, ...), hub id, or local directory")
    parser.add_argument("--out", type=Path, help="output directory (default: <model>-compressed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--recipe", type=Path, help="run a saved recipe (.yaml/.json) instead of the recipe flags")
    group = parser.add_argument_group("recipe (a flag left out takes the method's default)")
    group.add_argument("--rank-budget", type=float,
                       help=f"share of the dense parameters kept in low-rank factors, (0, 1] (default "
                            f"{FactorizeConfig.rank_budget})")
    group.add_argument("--factorize", choices=METHODS["factorize"],
                       help=f"factorization (default {DEFAULT_METHODS['factorize']})")
    group.add_argument("--allocate",
                       help="rank allocation over layers: uniform (default) or welore; lorap's is its own")
    group.add_argument("--wbits", type=int, help=f"quantize weights (or factors) to 2, 3, 4 or 8 bits "
                                                 f"(default {GridConfig.bits})")
    group.add_argument("--quantize", choices=METHODS["quantize"],
                       help=f"quantizer (default {DEFAULT_METHODS['quantize']})")
    group.add_argument("--group-size", type=int,
                       help=f"columns per quantization group (default {GridConfig.group_size}; 0: whole row)")
    group.add_argument("--sym", action="store_true", default=None, help="symmetric grid (default asymmetric)")
    group.add_argument("--clip", choices=CLIPS,
                       help=f"each group's range: its min-max, or the shrink of it with the least error (default "
                            f"{GridConfig.clip})")
    group.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                       help=f"GPTQ: columns by decreasing Hessian diagonal (default {GPTQ.act_order})")
    group.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                       help=f"GPTQ: group scales fixed before the loop (default {GPTQ.static_groups})")
    group.add_argument("--damp", type=float,
                       help=f"GPTQ: damping, fraction of the mean Hessian diagonal (default {GPTQ.damp})")
    group.add_argument("--alpha", type=float,
                       help=f"GPTAQ: weight of the asymmetric term (default {GPTAQ.alpha})")
    group.add_argument("--iterations", type=int,
                       help=f"learned quantizers (lrq, cbq, signround): optimisation steps per window "
                            f"(default {LearnedConfig.iterations})")
    group.add_argument("--start", choices=STARTS,
                       help=f"SignRound: what the learned rounding starts from, round-to-nearest or GPTQ's result "
                            f"(default {SignRound.start})")
    group.add_argument("--compensate", choices=METHODS["compensate"],
                       help=f"add a low-rank compensation of the quantization error "
                            f"(default {DEFAULT_METHODS['compensate']})")
    group.add_argument("--compensate-rank", type=int,
                       help=f"rank of the compensation (default {CompensateConfig.rank})")
    group.add_argument("--compensate-bits", type=int,
                       help=f"bits of the compensation factors, quantized per output channel: 2/3/4/8, or 16 to keep "
                            f"them in fp16 (default {CompensateConfig.factor_bits})")
    group.add_argument("--no-true-sequential", dest="true_sequential", action="store_false", default=None,
                       help="capture every linear's statistics from the uncompressed block (default: group by group in "
                            "data-flow order, each with the earlier groups of the block compressed)")
    group.add_argument("--bpw", type=float,
                       help="a size budget in bits per weight: each layer's bits, group size and compensation rank "
                            "are searched to meet it (compress/search.py); the quantizer defaults to gptaq")
    group.add_argument("--gram-dtype", choices=GRAM_DTYPE_CHOICES,
                       help="precision of the input statistics (default auto: float64 unless a capture step's Grams "
                            "would take over half of the device's memory, then float32 for the widest)")
    group.add_argument("--calib", help="calibration text: datasets name, or local txt/jsonl/parquet file or folder")
    group.add_argument("--nsamples", type=int, help=f"calibration windows (default {Calibration.nsamples})")
    group.add_argument("--seqlen", type=int, help="tokens per window (default min(2048, model max positions))")
    group.add_argument("--seed", type=int, help=f"seed for drawing the windows (default {Calibration.seed})")
    run = parser.add_argument_group("running")
    run.add_argument("--device", help="where each block computes: cuda, cuda:N or cpu (default cuda when available)")
    run.add_argument("--offload", action="store_true",
                     help="keep the calibration activations on the CPU in half precision (halves their memory)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    ppl = parser.add_mutually_exclusive_group()
    ppl.add_argument("--eval-ppl", nargs="?", const="demo", metavar="SRC",
                     help="report perplexity before and after on SRC (default for --model demo: the held-out text)")
    ppl.add_argument("--no-eval-ppl", action="store_true", help="skip the perplexity evaluation")
    return parser


def build_recipe(args: argparse.Namespace) -> Recipe:
    flags = [flag for table in (*STAGE_FLAGS.values(), CALIBRATION_FLAGS) for flag in table]
    given = [flag for flag in [*flags, *STAGE_FLAGS, "true_sequential", "bpw", "gram_dtype"]
             if getattr(args, flag) is not None]
    if args.recipe:
        if given:
            flag = "no-true-sequential" if given[0] == "true_sequential" else given[0].replace("_", "-")
            raise CompressError(f"--recipe runs a saved recipe; drop --{flag}")
        return Recipe.load(args.recipe)
    if args.bpw is not None:
        chosen = [flag for flag in ("wbits", "group_size", "compensate_rank") if getattr(args, flag) is not None]
        if chosen:
            raise CompressError(f"--bpw chooses bits, group sizes and compensation ranks per layer; drop "
                                f"--{chosen[0].replace('_', '-')}")
        if args.quantize is None:
            args.quantize = BPW_QUANTIZER
    stages = {stage: stage_config(stage, args) for stage in STAGE_FLAGS}
    calibration = Calibration(**{field: getattr(args, flag) for flag, field in CALIBRATION_FLAGS.items()
                                 if getattr(args, flag) is not None})
    return Recipe(**stages, calibration=calibration, true_sequential=args.true_sequential is not False,
                  bpw=args.bpw, gram_dtype=args.gram_dtype or "auto")


def stage_config(stage: str, args: argparse.Namespace):
    """The config of one stage from its flags (None when none is given): the method flag picks the config type,
    the others set its fields, and what is left out keeps the config's default."""
    method = getattr(args, stage)
    given = {flag: getattr(args, flag) for flag in STAGE_FLAGS[stage] if getattr(args, flag) is not None}
    if method is None and not given:
        return None
    method = method or DEFAULT_METHODS[stage]
    kind = config_type(stage, method)
    fields = {f.name for f in dataclasses.fields(kind)}
    wrong = [flag for flag in given if STAGE_FLAGS[stage][flag] not in fields]
    if wrong:
        raise CompressError(f"--{wrong[0].replace('_', '-')} does not apply to --{stage} {method}")
    if given.get("compensate_bits") == 16:  # fp16 factors: stored as they are, not quantized
        given["compensate_bits"] = None
    return kind(**{STAGE_FLAGS[stage][flag]: value for flag, value in given.items()})


def default_out(model: str, recipe: Recipe) -> Path:
    name = Path(model).name or "model"
    parts = [f"r{recipe.factorize.rank_budget:g}"] if recipe.factorize else []
    if recipe.bpw is not None:
        parts.append(f"bpw{recipe.bpw:g}")
    elif recipe.quantize:
        parts.append(f"w{recipe.quantize.bits}")
    return Path(f"{name}-{'-'.join(parts)}")


def run_compress(argv: list[str]) -> int:
    from compress.models import load_model, resolve_model
    from compress.formats.native import check_out, load_compressed, save_compressed
    from compress.pipeline import compress_model, compress_to_directory
    from compress.streaming import has_shards, work_directory
    from transformers import AutoTokenizer

    from evaluations.perplexity import cached_perplexity, text_perplexity
    from evaluations.plots import plot_forms, plot_ranks

    args = compress_parser().parse_args(argv)
    recipe = build_recipe(args)
    import torch

    from compress import distributed

    world = distributed.world(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # torchrun: joined
    out = args.out or default_out(args.model, recipe)
    if not args.resume or not work_directory(out).exists():
        check_out(out, args.overwrite)
    ppl_source = None if args.no_eval_ppl or not world.main else \
        (args.eval_ppl or ("demo" if args.model == "demo" else None))
    original = ppl_tokenizer = None
    if ppl_source:
        loaded = {}

        def evaluate() -> dict:
            model, loaded["tokenizer"], _ = load_model(args.model)
            return text_perplexity(model, loaded["tokenizer"], ppl_source)

        resolved = resolve_model(args.model)
        original = cached_perplexity(resolved, ppl_source, evaluate)  # a local model's score is kept
        ppl_tokenizer = loaded.get("tokenizer") or AutoTokenizer.from_pretrained(resolved)

    def extras(directory: Path, compressed, model=None) -> None:
        """Perplexity after (of the output as written) and the rank plot, added before the output is moved in place."""
        report = compressed.report
        if original:
            after = text_perplexity(model or load_compressed(directory), ppl_tokenizer, ppl_source)
            report["perplexity"] = {"original": original["perplexity"], "compressed": after["perplexity"],
                                    "source": ppl_source, "seqlen": after["seqlen"], "tokens": after["tokens"]}
            (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if recipe.factorize:
            plot_ranks(report, directory / "ranks.png")
        if recipe.bpw is not None:
            plot_forms(report, directory / "forms.png")

    resolved = resolve_model(args.model)
    if Path(resolved).is_dir() and not has_shards(resolved):  # e.g. pytorch_model.bin only: the whole model in memory
        if args.resume:
            raise CompressError(f"--resume needs a safetensors checkpoint; {resolved} has none")
        model, tokenizer, resolved = load_model(args.model)
        compressed = compress_model(model, recipe, tokenizer=tokenizer)
        compressed.base_model = compressed.report["base_model"] = args.model if args.model == "demo" else resolved
        if world.main:
            save_compressed(compressed, out, overwrite=args.overwrite,
                            extras=lambda directory: extras(directory, compressed, compressed.model))
        distributed.barrier(world)
    else:
        compressed = compress_to_directory(args.model, recipe, out, device=args.device, offload=args.offload,
                                           resume=args.resume, overwrite=args.overwrite, extras=extras)
    if world.main:
        print(summary(compressed.report))
        print(f"wrote {out.resolve()}")
    return 0


def summary(report: dict) -> str:
    lines = [f"bits per weight {report['bits_per_weight']:.3f}   {report['seconds']:.1f} s"]
    if "bpw" in report:
        search = report["bpw"]
        lines.append(f"--bpw {search['budget']:g}: " + (f"forms searched in {search['seconds']:.1f} s" if "seconds" in
                                                        search else "forms replayed from the recipe"))
        lines += forms_table(report)
    if "perplexity" in report:
        ppl = report["perplexity"]
        lines.append(f"perplexity ({ppl['source']}, {ppl['seqlen']}-token windows): "
                     f"original {ppl['original']:.3f} -> compressed {ppl['compressed']:.3f}")
    lines += [f"note: {note}" for note in report["notes"][:5]]
    if len(report["notes"]) > 5:
        lines.append(f"note: ... {len(report['notes']) - 5} more in report.json")
    return "\n".join(lines)


def forms_table(report: dict) -> list[str]:
    return [f"  {kind}: " + ", ".join(f"{form} x{n}" for form, n in sorted(forms.items())) for kind, forms in
            count_forms(report).items()]


def run_eval(argv: list[str]) -> int:
    from compress.formats import load_any
    from evaluations.harness import run_tasks
    from evaluations.harness import summary as tasks_summary
    from evaluations.perplexity import text_perplexity

    parser = argparse.ArgumentParser(prog="compress eval", description="Evaluate a compressed or plain model.")
    parser.add_argument("model", help="this tool's output, a GPTQ or compressed-tensors pack-quantized checkpoint "
                                      "(each with its adapter/ when there is one), HF model directory, alias or hub id")
    parser.add_argument("--ppl", metavar="SRC", help="perplexity on demo, a text file or folder, or a datasets name")
    parser.add_argument("--seqlen", type=int, help="window length (default min(2048, model max positions))")
    parser.add_argument("--tasks", help="lm-eval tasks, comma-separated: hub tasks (online) or local ones "
                                        "(evaluations/tasks: python_next_line)")
    parser.add_argument("--limit", type=int, help="lm-eval: examples per task (default all)")
    parser.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default 16)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if not args.ppl and not args.tasks:
        raise CompressError("nothing to evaluate: give --ppl SRC and/or --tasks t1,t2")
    if args.limit is not None and args.limit < 1:
        raise CompressError(f"--limit must be >= 1, got {args.limit}")
    model, tokenizer = load_any(args.model)
    result: dict = {"model": args.model}
    if args.ppl:
        result.update(text_perplexity(model, tokenizer, args.ppl, seqlen=args.seqlen))
        print(f"perplexity {result['perplexity']:.4f}  ({result['source']}, {result['tokens']} tokens, "
              f"{result['seqlen']}-token windows)")
    if args.tasks:
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        result.update(run_tasks(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                                num_fewshot=args.num_fewshot))
        print(tasks_summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_compensate(argv: list[str]) -> int:
    import shutil

    from compress.formats import dequantized_weights, detect_format, recorded_original
    from compress.formats.lora import ADAPTER, layer_factors, save_lora_adapter
    from compress.formats.native import atomic_directory, check_out
    from compress.models import load_model
    from compress.pipeline import compress_model

    parser = argparse.ArgumentParser(prog="compress compensate", description="Add a low-rank compensation of the "
                                                                             "quantization error to a quantized model.")
    parser.add_argument("--model", required=True, type=Path,
                        help="quantized model directory: GPTQ, compressed-tensors pack-quantized, or this tool's "
                             "output")
    parser.add_argument("--original", help="the full-precision model it was quantized from (alias, hub id, dir); "
                                           "default for this tool's outputs: the model they record")
    parser.add_argument("--rank", type=int, default=CompensateConfig.rank,
                        help=f"rank of the compensation (default {CompensateConfig.rank})")
    parser.add_argument("--method", choices=METHODS["compensate"], default=DEFAULT_METHODS["compensate"],
                        help=f"compensation method (default {DEFAULT_METHODS['compensate']})")
    parser.add_argument("--factor-bits", type=int, help="quantize the factors per output channel (default: fp16)")
    parser.add_argument("--out", type=Path, required=True, help="output: the quantized files unchanged, plus adapter/")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--calib")
    parser.add_argument("--nsamples", type=int, default=Calibration.nsamples)
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--seed", type=int, default=Calibration.seed)
    args = parser.parse_args(argv)
    recipe = Recipe(compensate=config_type("compensate", args.method)(args.rank, args.factor_bits),
                    calibration=Calibration(args.calib, args.nsamples, args.seqlen, args.seed))
    check_out(args.out, args.overwrite)
    if not args.model.is_dir():
        raise CompressError(f"quantized model directory '{args.model}' does not exist")
    source_format = detect_format(args.model)
    original = args.original or recorded_original(args.model)
    if original is None:
        raise CompressError(f"{args.model} ({source_format}) does not record the full-precision model it was "
                            "quantized from: pass --original MODEL")
    try:
        model, tokenizer, resolved = load_model(original)
    except CompressError as exc:
        if args.original:
            raise
        raise CompressError(f"{args.model} records its full-precision model as {original!r}, which does not load "
                            f"({exc}): pass --original MODEL") from None
    bases = dequantized_weights(args.model)
    result = compress_model(model, recipe, tokenizer=tokenizer, bases=bases)
    factors = {name: layer_factors(model.get_submodule(name)) for name in result.report["layers"]}
    with atomic_directory(args.out, args.overwrite) as tmp:
        shutil.copytree(args.model, tmp, dirs_exist_ok=True)
        save_lora_adapter(factors, resolved, tmp / ADAPTER)
        record = {"source_format": source_format, "original": resolved, "recipe": recipe.to_dict(),
                  "report": result.report}
        (tmp / "compensation.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{source_format}: {len(factors)} layers compensated with {args.method} rank {args.rank}   "
          f"{result.report['seconds']:.1f} s")
    print(f"wrote {args.out.resolve()}  (quantized files unchanged; LoRA adapter in adapter/)")
    return 0


def run_export(argv: list[str]) -> int:
    from compress.formats import FORMATS, ExportOptions, export
    from compress.formats.dense import DTYPES
    from compress.formats.lora import ADAPTER

    parser = argparse.ArgumentParser(prog="compress export",
                                     description="Write a compressed output in a serving format.")
    parser.add_argument("model", type=Path, help="a compressed output directory (this tool's native format)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="gptq or compressed-tensors (+ LoRA adapter), gguf (llama.cpp), dense, native or onnx")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
                        help="gptq: v1 zero points (default, what vLLM reads); gptq_v2: true zero points")
    parser.add_argument("--merge-lowrank", action="store_true",
                        help="gptq, compressed-tensors: merge layers without a quantized base (pure low-rank, "
                             "dense) and requantize them (RTN); gguf: merge every layer with low-rank factors and "
                             "requantize it to Q8_0")
    parser.add_argument("--merge-bits", type=int, help="bits for --merge-lowrank (default: the recipe's, else 4)")
    parser.add_argument("--dtype", choices=DTYPES, help="dense: storage dtype (default: the checkpoint's own)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="dense and gptq: largest safetensors shard (default 5GB)")
    args = parser.parse_args(argv)
    options = ExportOptions(checkpoint_format=args.checkpoint_format, merge_lowrank=args.merge_lowrank,
                            merge_bits=args.merge_bits, dtype=args.dtype, max_shard_size=args.max_shard_size)
    result = export(args.model, args.format, args.out, options, overwrite=args.overwrite)
    for warning in result.warnings:
        print(f"compress: warning: {warning}", file=sys.stderr)
    print(f"{args.format}: " + ", ".join(f"{key} {value}" for key, value in result.checks.items()))
    if "adapter_rank" in result.checks:
        print(f"serve: vllm serve {result.path} --enable-lora --max-lora-rank {result.checks['adapter_rank']} "
              f"--lora-modules compensation={result.path / ADAPTER}")
    print(f"wrote {result.path.resolve()}")
    return 0


def run_report(argv: list[str]) -> int:
    from evaluations.report import collect_rows, write_report

    parser = argparse.ArgumentParser(prog="compress report", description="Compare compressed outputs side by side.",
                                     epilog="Each DIR's report.json is read, and DIR/eval.json when present (write it "
                                            "with compress eval DIR --tasks ... --json DIR/eval.json); a JSON file "
                                            "argument is a `compress eval --json` result of a plain model "
                                            "(the original).")
    parser.add_argument("outputs", nargs="+", type=Path, help="compressed output directories and/or eval JSON files")
    parser.add_argument("--out", required=True, type=Path, help="directory for report.md, report.json and pareto.png")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    paths = write_report(collect_rows(args.outputs), args.out, overwrite=args.overwrite)
    print(paths["table"].read_text())
    print(f"wrote {args.out.resolve()}  ({', '.join(p.name for p in paths.values())})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from calibration.data import CalibrationError

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["eval"]:
            return run_eval(argv[1:])
        if argv[:1] == ["compensate"]:
            return run_compensate(argv[1:])
        if argv[:1] == ["export"]:
            return run_export(argv[1:])
        if argv[:1] == ["report"]:
            return run_report(argv[1:])
        return run_compress(argv)
    except (CompressError, CalibrationError) as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted; --out was not written (a streamed run continues from its last finished block "
              "with --resume)", file=sys.stderr)
        return 130
    finally:
        from compress.distributed import close

        close()


if __name__ == "__main__":
    sys.exit(main())
