"""Speed of GPTQ on Llama-3-8B layer shapes: the torch column loop against the Triton block kernel
(kernels.gptq_triton), side by side in one run, checked to give the same bits, and the GPTQ time of a whole
8B model extrapolated from them (32 blocks of 7 linears).

    python -m evaluations.bench_gptq                 # GPU: both paths on the 8B shapes
    python -m evaluations.bench_gptq --scale 8       # CPU default: shapes / 8, the torch loop only

On a CPU the kernel only runs in triton's interpreter (correctness, not speed): only the torch loop is timed, and
the output says that the GPU figures were not measured. Writes evaluations/results/bench_gptq/results.json.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import kernels
from compress.quantize.gptq import run_gptq
from evaluations.bench_kernels import median_seconds
from evaluations.tables import table, write_results
from kernels.grid import resolve_group_size

# (name, out, in, linears of this shape per block): q and o, k and v, gate and up, down
LAYERS = (("q_proj/o_proj", 4096, 4096, 2), ("k_proj/v_proj", 1024, 4096, 2), ("gate/up_proj", 14336, 4096, 2),
          ("down_proj", 4096, 14336, 1))
BLOCKS = 32
COLUMNS = (("layer", "{:<14}"), ("shape", "{:<12}"), ("path", "{:<9}"), ("seconds", "{:>8.3f}"),
           ("speedup", "{:>7.1f}"), ("same_bits", "{!s:>9}"))


def problem(out_features: int, in_features: int, device: torch.device, g: torch.Generator):
    """A weight like a trained one (N(0, 0.02)) and the Gram of correlated inputs, 4 tokens per input channel."""
    mixing = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    tokens = (torch.randn(4 * in_features, in_features, generator=g) @ mixing).to(device, torch.float64)
    return torch.randn(out_features, in_features, generator=g).mul_(0.02).to(device), tokens.T @ tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=None,
                        help="divide the 8B shapes by this (default 1 on GPU, 8 on CPU)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per figure (median; CUDA events on a GPU)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--paths", nargs="+", choices=("reference", "triton"), default=None,
                        help="default both on a GPU, the torch loop on a CPU (triton there needs TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path("evaluations/results/bench_gptq"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    scale = args.scale or (1 if gpu else 8)
    wanted = args.paths or (["reference", "triton"] if gpu else ["reference"])
    # the reference first: the others compare to it
    paths = [path for path in ("reference", "triton") if path in wanted]
    device_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    notice = None if gpu else ("NO GPU: GPU figures were not measured. On CPUs the Triton block kernel runs only in "
                               f"triton's interpreter (correctness, not speed); 8B shapes / {scale}.")
    print(f"device: {device_name}; GPTQ W{args.bits} g{args.group_size}{' act-order' if args.act_order else ''}")
    if notice:
        print(notice)
    g = torch.Generator().manual_seed(0)
    rows, per_block = [], {}
    for name, out_features, in_features, count in LAYERS:
        out_features, in_features = out_features // scale, in_features // scale
        weight, gram = problem(out_features, in_features, device, g)
        group_size = resolve_group_size(in_features, args.group_size)
        results = {}
        for path in paths:
            os.environ[kernels.KERNELS_ENV] = path  # kernels.gptq_block's choice
            def quantize(weight=weight, gram=gram, group_size=group_size):
                return run_gptq(weight, gram, args.bits, group_size, symmetric=False, act_order=args.act_order)

            results[path] = quantize()  # untimed: compiles and autotunes the kernel
            seconds = median_seconds(quantize, device, args.repeat, warmup=0)
            same = "" if path == "reference" or "reference" not in results else all(
                torch.equal(getattr(results[path], field), getattr(results["reference"], field))
                for field in ("ints", "scales", "zeros", "g_idx"))
            reference_seconds = next((row["seconds"] for row in rows if row["layer"] == name), seconds)
            rows.append({"layer": name, "shape": f"{out_features}x{in_features}", "path": path,
                         "seconds": seconds, "speedup": reference_seconds / seconds, "same_bits": same})
            per_block[path] = per_block.get(path, 0.0) + count * seconds
        del weight, gram, results
    print("\n" + table(rows, COLUMNS))
    totals = {path: BLOCKS * seconds for path, seconds in per_block.items()}
    shapes = "8B" if scale == 1 else f"8B / {scale}"
    for path, total in totals.items():
        print(f"{path}: {per_block[path]:.2f} s of GPTQ per block, {total:.1f} s for {BLOCKS} blocks "
              f"of {shapes} shapes (the linears' GPTQ only: no calibration forward passes)")
    path = write_results({"device": device_name, "gpu_measured": gpu, "notice": notice, "shape_scale": scale,
                          "bits": args.bits, "group_size": args.group_size, "act_order": args.act_order,
                          "repeat": args.repeat, "layers": rows, "seconds_per_block": per_block,
                          f"seconds_{BLOCKS}_blocks": totals}, args.out)
    if notice:
        print(notice)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
