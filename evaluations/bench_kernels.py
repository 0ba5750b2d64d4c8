"""Speed of the compressed linear: dense matmul, the unfused sequence, the fused Triton kernels and torch's int4
kernel on Llama-3-8B layer shapes at batch 1, 16 and 2048; then decode tokens/s of compressed models.

    python -m evaluations.bench_kernels                      # GPU: CUDA events, the 8B shapes and an 8B-shaped model
    python -m evaluations.bench_kernels --llama-layers 8     # a shallower 8B-shaped model
    python -m evaluations.bench_kernels --scale 8            # CPU default: shapes / 8
    python -m evaluations.bench_kernels --scale 1 --batches 1 16 --repeat 5    # CPU, the 8B shapes

On a CPU the Triton kernels only run in the interpreter, so the reference path, the layer served through torch's
CPU int4 or int8 kernels (`serve_on_cpu`), the int4 kernel alone and dense matmul are timed, the demo and a two-block
8B-shaped model decode dense, compressed and served, and the output says that the GPU figures were not measured.
Writes evaluations/results/bench_kernels/results.json.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from evaluations.tables import table, write_results
from kernels.grid import QuantizedWeight, make_quantized, resolve_group_size
from kernels.reference import lowrank_linear_reference

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024))  # (in, out): q/o, gate/up, down, k/v projections
BATCHES = (1, 16, 2048)
GROUP_SIZE = 128
COMPENSATION_RANK = 64
# Peak HBM bandwidth (bytes/s) by device name, first match wins: H100 SXM 3.35 TB/s, H200 4.8 TB/s (vendor sheets).
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
                  ("4090", 1.008e12))
LAYER_COLUMNS = (("shape", "{:<11}"), ("batch", "{:>5}"), ("variant", "{:<28}"), ("ms", "{:>9.4f}"),
                 ("speedup_vs_dense", "{:>7.2f}"), ("bandwidth_fraction", "{:>6.2f}"))
DECODE_COLUMNS = (("model", "{:<34}"), ("tokens_per_s", "{:>8.1f}"), ("speedup_vs_dense", "{:>7.2f}"))


def peak_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of the device's memory from the table, None on a CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BANDWIDTH if key in name), None)


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int) -> float:
    """Median time of one call: CUDA events around each call with L2 flushed before it, or wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)  # larger than any L2: weights come from HBM
        for _ in range(repeat):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_quantized(rows: int, cols: int, bits: int, device: torch.device, g: torch.Generator) -> QuantizedWeight:
    """An asymmetric g128 QuantizedWeight with random ints, scales and zeros (speed does not depend on the values)."""
    group_size = resolve_group_size(cols, GROUP_SIZE)
    groups = cols // group_size
    ints = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32, device=device)
    scales = torch.rand(rows, groups, generator=g, device=device) * 0.01 + 0.001
    zeros = torch.randint(0, 2**bits, (rows, groups), generator=g, dtype=torch.int32, device=device)
    return make_quantized(ints, scales, zeros, bits, symmetric=False)


def nbytes(*operands) -> int:
    """Bytes of the tensors (and QuantizedWeight parts) that a matmul must read or write at least once."""
    total = 0
    for operand in operands:
        if isinstance(operand, QuantizedWeight):
            total += sum(t.numel() * t.element_size() for t in operand.tensors().values())
        elif operand is not None:
            total += operand.numel() * operand.element_size()
    return total


def budget_rank(in_features: int, out_features: int, budget: float = 0.5) -> int:
    """The rank whose factors hold `budget` of the dense parameters, down to a multiple of 32."""
    return max(32, int(budget * in_features * out_features / (in_features + out_features)) // 32 * 32)


def int4_torch(x: torch.Tensor, out_features: int, g: torch.Generator) -> Callable[[], torch.Tensor] | None:
    """torch's own int4 g128 kernel on a random weight (no low-rank path), or None where this torch lacks it."""
    in_features, device = x.shape[1], x.device
    ints = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.int32, device=device)
    scales_and_zeros = torch.rand(in_features // GROUP_SIZE, out_features, 2, generator=g, device=device).to(x.dtype)
    try:
        if device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack((ints[:, ::2] << 4 | ints[:, 1::2]).to(torch.uint8), 8)
            call = lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP_SIZE, scales_and_zeros)  # noqa: E731
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints, 8)
            call = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                x, packed, GROUP_SIZE, scales_and_zeros)
        call()
        return call
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        print(f"torch int4 kernel unavailable: {str(exc).splitlines()[0][:120]}")
        return None


def bench_layers(shapes, batches, dtype: torch.dtype, device: torch.device, repeat: int, warmup: int) -> list[dict]:
    """One row per (shape, batch, variant): median ms, speedup over dense and fraction of the bandwidth limit."""
    from compress.layer import CompressedLinear
    from kernels import lowrank_linear_triton

    gpu, peak = device.type == "cuda", peak_bandwidth(device)
    g = torch.Generator(device).manual_seed(0)
    rows = []
    for in_features, out_features in shapes:
        dense = torch.randn(out_features, in_features, generator=g, device=device).to(dtype) * 0.02
        base = random_quantized(out_features, in_features, 4, device, g)
        up = torch.randn(out_features, COMPENSATION_RANK, generator=g, device=device).to(dtype) * 0.01
        down = torch.randn(COMPENSATION_RANK, in_features, generator=g, device=device).to(dtype) * 0.01
        rank = budget_rank(in_features, out_features)
        up4, down4 = (random_quantized(out_features, rank, 4, device, g),
                      random_quantized(rank, in_features, 4, device, g))
        formats = {"w4g128+r64": (base, up, down), "w4g128 (rank 0)": (base, None, None),
                   "r0.5 w4 factors": (None, up4, down4)}
        for batch in batches:
            x = torch.randn(batch, in_features, generator=g, device=device).to(dtype)
            out = batch * out_features * dtype.itemsize
            variants = [("dense", lambda: x @ dense.T, nbytes(x, dense) + out)]
            for label, parts in formats.items():
                moved = nbytes(x, *parts) + out
                variants.append((f"{label} unfused", partial(lowrank_linear_reference, x, *parts), moved))
                if gpu:
                    variants.append((f"{label} fused", partial(lowrank_linear_triton, x, *parts), moved))
            int4 = int4_torch(x, out_features, g)
            if int4 is not None:
                variants.append(("int4 torch (w4g128, rank 0)", int4, nbytes(x, base) + out))
            if not gpu:  # the layer as load_compressed serves it after serve_on_cpu: int4/int8 kernel + two matmuls
                served = {**formats, "w8g128 (rank 0)": (random_quantized(out_features, in_features, 8, device, g),
                                                         None, None)}
                for label in ("w4g128+r64", "w4g128 (rank 0)", "w8g128 (rank 0)"):
                    layer = CompressedLinear.from_parts(*served[label])
                    if layer.serve_on_cpu():
                        kind = "int4" if label.startswith("w4") else "int8"
                        variants.append((f"{label} served (cpu {kind})", partial(layer, x),
                                         nbytes(x, *served[label]) + out))
            dense_seconds = None
            for name, fn, moved in variants:
                seconds = median_seconds(fn, device, repeat, warmup)
                dense_seconds = dense_seconds or seconds
                fraction = moved / peak / seconds if peak else None
                rows.append({"shape": f"{in_features}x{out_features}", "in": in_features, "out": out_features,
                             "batch": batch, "variant": name, "ms": seconds * 1e3,
                             "speedup_vs_dense": dense_seconds / seconds,
                             "bytes_moved": moved, "bandwidth_fraction": fraction})
                print(format_layer_row(rows[-1]), flush=True)
    return rows


def format_layer_row(row: dict) -> str:
    return "| " + " | ".join("-" if row[name] is None else fmt.format(row[name]) for name, fmt in LAYER_COLUMNS) + " |"


def tokens_per_second(model, device: torch.device, new_tokens: int, prompt: int = 16) -> float:
    """Greedy generation at batch 1: new tokens per second after a warm-up generation."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device)
    generate = lambda: model.generate(  # noqa: E731
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    generate()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def bench_demo(dtype: torch.dtype, device: torch.device, new_tokens: int, nsamples: int) -> list[dict]:
    """The demo model dense, W4 g128 + rank-64 compensation, and rank budget 0.5 with 4-bit factors."""
    from compress import RTN, SVD, Calibration, LoRC, Recipe, compress_model
    from compress.layer import serve_on_cpu
    from compress.models import load_model

    calibration = Calibration(nsamples=nsamples)
    recipes = {"demo w4g128 + lorc r64": Recipe(quantize=RTN(4, 128), compensate=LoRC(64),
                                                calibration=calibration),
               "demo svd r0.5 + w4g128 factors": Recipe(factorize=SVD(0.5),
                                                        quantize=RTN(4, 128),
                                                        calibration=calibration)}
    model, _, _ = load_model("demo")
    rows = [{"model": "demo dense", "tokens_per_s": tokens_per_second(model.to(device, dtype), device, new_tokens)}]
    for name, recipe in recipes.items():
        model, tokenizer, _ = load_model("demo")
        compressed = compress_model(model, recipe, tokenizer=tokenizer, progress=False).model
        rows.append({"model": name,
                     "tokens_per_s": tokens_per_second(compressed.to(device, dtype), device, new_tokens)})
        if device.type == "cpu":
            counts = serve_on_cpu(compressed)
            rows.append({"model": f"{name} served ({counts['int4']} int4)",
                         "tokens_per_s": tokens_per_second(compressed, device, new_tokens)})
    return with_speedup(rows)


def bench_llama(layers: int, device: torch.device, new_tokens: int) -> list[dict]:
    """A Llama-3-8B-shaped model with random weights (bf16 on a GPU, float32 on a CPU), dense and then with every
    block linear W4 g128 + rank 64; on a CPU also served through the int4 kernel (serve_on_cpu)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.layer import CompressedLinear, serve_on_cpu

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    label = f"llama-3-8b-shaped ({layers} layers)"
    rows = [{"model": f"{label} dense {str(dtype)[6:]}", "tokens_per_s": tokens_per_second(model, device, new_tokens)}]
    g = torch.Generator(device).manual_seed(0)
    for name, linear in [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]:
        out_features, in_features = linear.weight.shape
        up = torch.randn(out_features, COMPENSATION_RANK, generator=g, device=device, dtype=dtype) * 0.01
        down = torch.randn(COMPENSATION_RANK, in_features, generator=g, device=device, dtype=dtype) * 0.01
        model.model.layers.set_submodule(name, CompressedLinear.from_parts(
            random_quantized(out_features, in_features, 4, device, g), up, down))
    rows.append({"model": f"{label} w4g128 + r64", "tokens_per_s": tokens_per_second(model, device, new_tokens)})
    if device.type == "cpu":
        counts = serve_on_cpu(model)
        rows.append({"model": f"{label} w4g128 + r64 served ({counts['int4']} int4)",
                     "tokens_per_s": tokens_per_second(model, device, new_tokens)})
    return with_speedup(rows)


def with_speedup(rows: list[dict]) -> list[dict]:
    return [{**row, "speedup_vs_dense": row["tokens_per_s"] / rows[0]["tokens_per_s"]} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=None,
                        help="divide the 8B shapes by this (default 1 on GPU, 8 on CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed calls per figure (default 100 on GPU, 10 on CPU)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="generated tokens per decode figure (64 GPU, 32 CPU)")
    parser.add_argument("--llama-layers", type=int, default=None,
                        help="blocks of the 8B-shaped model (default 32 on GPU, 2 on CPU; 0: skip)")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows for the compressed demo models")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one keeps timings steady on a shared CPU)")
    parser.add_argument("--out", type=Path, default=Path("evaluations/results/bench_kernels"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    # CPU bf16 matmuls are emulated on most CPUs: fp32 is its fast path
    dtype = torch.bfloat16 if gpu else torch.float32
    scale = args.scale or (1 if gpu else 8)
    repeat = args.repeat or (100 if gpu else 10)
    new_tokens = args.new_tokens or (64 if gpu else 32)
    device_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    notice = None if gpu else ("NO GPU: GPU figures were not measured. CPU timings of the reference path, the layer "
                               "served through torch's CPU int4 kernel (bfloat16), that kernel alone and dense "
                               f"{dtype} matmul on the 8B shapes divided by {scale}; "
                               "the fused Triton kernels run on CPUs only in triton's interpreter "
                               "(correctness, not speed) and are not timed.")
    print(f"device: {device_name}, activations {dtype}, peak bandwidth {peak_bandwidth(device) or 'unknown'}")
    if notice:
        print(notice)
    shapes = [(in_features // scale, out_features // scale) for in_features, out_features in SHAPES]
    print("\n| " + " | ".join(name for name, _ in LAYER_COLUMNS) + " |")
    layer_rows = bench_layers(shapes, args.batches, dtype, device, repeat, warmup=max(3, repeat // 10))
    decode_rows = bench_demo(dtype, device, new_tokens, args.nsamples)
    llama_layers = args.llama_layers if args.llama_layers is not None else (32 if gpu else 2)
    if llama_layers:
        decode_rows += bench_llama(llama_layers, device, new_tokens)
    print("\n" + table(decode_rows, DECODE_COLUMNS))
    path = write_results({"device": device_name, "gpu_measured": gpu, "notice": notice, "dtype": str(dtype),
                          "peak_bandwidth": peak_bandwidth(device), "shape_scale": scale, "repeat": repeat,
                          "new_tokens": new_tokens, "threads": torch.get_num_threads(), "layers": layer_rows,
                          "decode": decode_rows}, args.out)
    if notice:
        print(notice)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
