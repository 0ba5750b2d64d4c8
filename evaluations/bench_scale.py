"""Compress a Llama-3-8B-shaped checkpoint (random weights) block by block: peak memory and time per block.

    python -m evaluations.bench_scale --blocks 1             # quick: the first block only (CPU: minutes)
    python -m evaluations.bench_scale --device cuda --nsamples 128 --seqlen 2048   # the whole model on a GPU
    python -m evaluations.bench_scale --blocks 1 --recipes gptq-w4 --runs 1x1 2x1 1x2   # torch.distributed scaling
    python -m evaluations.bench_scale --shape 70b --blocks 1 --recipes gptq-w4-eora64    # a 70B-shaped block

--runs RxT runs each recipe as R ranks of T threads each (R > 1: R processes joined by torch.distributed, gloo on the
CPU, as torchrun starts them), and prints seconds per block as ratios against the first run, with each run's share
of time in collectives (transfers and waiting for the slowest rank; the rank that spent the most).

The checkpoint is written shard by shard (one block per shard, bf16, never whole in memory), then each recipe runs
in its own process so that its peak resident memory is its own: `--rank-budget 0.5 --wbits 4` (SVD-LLM, 4-bit
factors), GPTQ W4 g128, and GPTQ W4 g128 + EoRA rank 64 (`--recipes` picks; on a GPU with a 10-minute limit per
command, run one recipe per command: the checkpoint in --work is written once and reused). Random weights have no
low-rank structure: these are speed and memory figures, not quality ones. The extrapolated total is the run's fixed
cost plus the mean block time x 32.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA_3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
SHAPES = {"8b": LLAMA_3_8B,
          "70b": {**LLAMA_3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                  "num_attention_heads": 64},
          "405b": {**LLAMA_3_8B, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                   "num_attention_heads": 128}}
# The figures in results/bench_scale were measured with every Gram captured from the uncompressed block
# (true_sequential false); --true-sequential measures the default, which adds a capture pass per data-flow group.
RECIPES = {
    "r0.5-w4": {"factorize": {"method": "svd-llm", "rank_budget": 0.5}, "quantize": {"method": "rtn", "bits": 4},
                "true_sequential": False},
    "gptq-w4": {"quantize": {"method": "gptq", "bits": 4}, "true_sequential": False},
    "gptq-w4-eora64": {"quantize": {"method": "gptq", "bits": 4}, "compensate": {"method": "eora", "rank": 64},
                       "true_sequential": False},
}


def write_checkpoint(directory: Path, blocks: int, seed: int = 0, shape: str = "8b") -> None:
    """A Llama-3-`shape`-shaped checkpoint with `blocks` decoder blocks of N(0, 0.02) bf16 weights, one shard per
    block."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": blocks}, dtype="bfloat16")
    shapes = block_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    total = blocks + 2
    weight_map = {}

    def random(shape: tuple[int, ...], rows: int = 4096) -> torch.Tensor:
        """N(0, 0.02) in bf16, made `rows` rows at a time: a 405B embedding is 8.4 GB in float32."""
        values = torch.empty(shape, dtype=torch.bfloat16)
        for chunk in values.view(-1, shape[-1]).split(rows):
            chunk.copy_(torch.randn(chunk.shape, generator=generator).mul_(0.02))
        return values

    def shard(index: int, tensors: dict[str, tuple[int, ...]]) -> None:
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        values = {key: torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else random(shape)
                  for key, shape in tensors.items()}
        save_file(values, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in values})

    for index in range(blocks):
        shard(index, {f"model.layers.{index}.{key}": shape for key, shape in shapes.items()})
    shard(blocks, {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
                   "model.norm.weight": (config.hidden_size,)})
    shard(blocks + 1, {"lm_head.weight": (config.vocab_size, config.hidden_size)})  # one large tensor per shard
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(directory)


def block_shapes(config) -> dict[str, tuple[int, ...]]:
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    return {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, hidden),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter)}


def compress_once(model: Path, recipe_name: str, out: Path, nsamples: int, seqlen: int, device: str | None,
                  offload: bool, true_sequential: bool = False) -> dict:
    """One recipe on the checkpoint, in this process; the figures as a record."""
    from compress.pipeline import compress_to_directory
    from compress.recipe import Recipe

    recipe = Recipe.from_dict({**RECIPES[recipe_name], "calibration": {"nsamples": nsamples, "seqlen": seqlen},
                               "true_sequential": true_sequential})
    ids = torch.randint(0, LLAMA_3_8B["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    # every rank draws the same windows and keeps its share
    start = time.time()
    compressed = compress_to_directory(str(model), recipe, out, calib=ids, device=device, offload=offload,
                                       overwrite=True, progress=False)
    seconds = time.time() - start
    from compress import distributed

    world = distributed.world()
    report = compressed.report
    blocks = report["block_seconds"]
    fixed = seconds - sum(blocks)
    record = {"recipe": recipe_name, "true_sequential": true_sequential, "blocks": len(blocks),
              "nsamples": nsamples, "seqlen": seqlen,
              "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
              "threads": torch.get_num_threads(), "ranks": world.size,
              "collective_seconds": round(distributed.most(distributed.COLLECTIVE_SECONDS[0], world), 1),
              "offload": offload, "seconds": round(seconds, 1), "block_seconds": blocks,
              "fixed_seconds": round(fixed, 1),
              "extrapolated_32_blocks_seconds": round(fixed + 32 * sum(blocks) / len(blocks), 1),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "bits_per_weight": round(report["bits_per_weight"], 3), "commit": commit()}
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
        record["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return record


def commit() -> str | None:
    """The code's git commit (None outside a checkout): results.json keeps the figures of every run."""
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return run.stdout.strip() or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="8b", help="Llama-3-8B, 3-70B or 3.1-405B widths")
    parser.add_argument("--blocks", type=int, default=32, help="decoder blocks to write and compress (Llama-3-8B: 32)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--runs", nargs="+", default=[None], metavar="RxT",
                        help="R ranks (torch.distributed, gloo) of T threads each, e.g. 1x1 2x1 1x2 (default: one "
                             "process, torch's threads)")
    parser.add_argument("--device", help="cuda or cpu (default cuda when available)")
    parser.add_argument("--offload", action="store_true", help="calibration activations in half precision on the CPU")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"),
                        help="where the checkpoint and outputs go")
    parser.add_argument("--json", type=Path, default=Path("evaluations/results/bench_scale/results.json"))
    parser.add_argument("--true-sequential", action="store_true", help="the default capture (figures so far: without)")
    parser.add_argument("--one", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # the child's threads
    args = parser.parse_args(argv)
    model = args.work / (f"llama-3-{args.shape}-shaped-{args.blocks}" if args.shape != "8b"
                         else f"llama-3-8b-shaped-{args.blocks}")
    if args.one:
        if args.threads:
            torch.set_num_threads(args.threads)
        record = compress_once(model, args.one[0], Path(args.one[1]), args.nsamples, args.seqlen, args.device,
                               args.offload, args.true_sequential)
        record["shape"] = args.shape
        if int(os.environ.get("RANK", "0")) == 0:
            print("RECORD " + json.dumps(record))
        return
    if not (model / "model.safetensors.index.json").is_file():
        start = time.time()
        write_checkpoint(model, args.blocks, shape=args.shape)
        print(f"wrote {model} ({args.blocks} blocks) in {time.time() - start:.0f} s, "
              f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    records = []
    for name in args.recipes:
        for run in args.runs:
            ranks, threads = (int(part) for part in run.split("x")) if run else (1, None)
            command = [sys.executable, "-m", "evaluations.bench_scale", "--shape", args.shape, "--blocks",
                       str(args.blocks), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--work",
                       str(args.work), "--one", name, str(args.work / f"out-{name}-{args.blocks}")]
            command += ["--device", args.device] if args.device else []
            command += ["--offload"] if args.offload else []
            command += ["--true-sequential"] if args.true_sequential else []
            command += ["--threads", str(threads)] if threads else []
            record = run_ranks(command, ranks, threads)
            if record is None:
                sys.exit(f"{name} ({run}) failed")
            records.append(record)
            print(format_record(records[-1]), flush=True)
    if any(args.runs):
        print(scaling_table(records))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.json.read_text()) if args.json.is_file() else []
    args.json.write_text(json.dumps(previous + records, indent=2) + "\n")
    if not torch.cuda.is_available():
        print("no GPU here: the GPU targets (whole model, 128 x 2048 calibration) were not measured")


def run_ranks(command: list[str], ranks: int, threads: int | None) -> dict | None:
    """The command as `ranks` processes joined as torchrun joins them (one process as it is); rank 0's record."""
    port = 29500 + os.getpid() % 1000
    processes = []
    for rank in range(ranks):
        env = dict(os.environ)
        if ranks > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks),
                       LOCAL_RANK=str(rank))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    outputs = [process.communicate() for process in processes]
    if any(process.returncode for process in processes):
        print("\n".join(err[-3000:] for _, err in outputs), file=sys.stderr)
        return None
    lines = [line for line in outputs[0][0].splitlines() if line.startswith("RECORD ")]
    return json.loads(lines[-1][len("RECORD "):]) if lines else None


def scaling_table(records: list[dict]) -> str:
    """Seconds per block of each run, as throughput against the first run of its recipe."""
    lines = ["| recipe | ranks x threads | s / block | throughput vs first | time in collectives |",
             "|---|---|---|---|---|"]
    first: dict[str, float] = {}
    for record in records:
        per_block = sum(record["block_seconds"]) / record["blocks"]
        base = first.setdefault(record["recipe"], per_block)
        lines.append(f"| {record['recipe']} | {record['ranks']} x {record['threads']} | {per_block:.0f} | "
                     f"{base / per_block:.2f}x | {record['collective_seconds'] / record['seconds']:.0%} |")
    return "\n".join(lines)


def format_record(record: dict) -> str:
    per_block = sum(record["block_seconds"]) / record["blocks"]
    gpu = f", peak GPU {record['peak_gpu_gib']} GiB on {record['gpu']}" if "gpu" in record else ""
    return (f"{record['recipe']:>15}: {record['blocks']} block(s), {record['nsamples']} x {record['seqlen']} tokens on "
            f"{record['device']} ({record.get('ranks', 1)} x {record['threads']} threads): "
            f"{per_block:.0f} s per block, "
            f"fixed {record['fixed_seconds']:.0f} s, "
            f"extrapolated to 32 blocks {record['extrapolated_32_blocks_seconds'] / 60:.1f} min; peak RSS "
            f"{record['peak_rss_gib']} GiB{gpu}; {record['bits_per_weight']} bits per weight")


if __name__ == "__main__":
    main()
