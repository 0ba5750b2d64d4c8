"""Calibration text from a `datasets` hub name or a local txt/jsonl/parquet file or folder, and token windows."""
from __future__ import annotations

import random
from pathlib import Path

import torch

# Short names for the common calibration and evaluation sets: (path, config, split).
HUB_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test"),
    "wikitext2-train": ("wikitext", "wikitext-2-raw-v1", "train"),
    "c4": ("allenai/c4", "en", "validation"),
    "pile": ("mit-han-lab/pile-val-backup", None, "validation"),
}
LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CalibrationError(ValueError):
    """The calibration source cannot be read or holds too little text."""


def load_text(source: str | Path, max_chars: int | None = None) -> str:
    """All text of a source joined by blank lines: a local file or folder, or a `datasets` hub name.

    Hub names may carry a config and split as `path:config:split`; aliases: wikitext2, c4, pile.
    Documents are kept in order until `max_chars` is reached, the last one cut there (None: all).
    """
    import datasets

    source = str(source)
    path = Path(source).expanduser()
    try:
        if path.exists():
            dataset = _load_local(path)
        else:
            name, config, split = HUB_ALIASES.get(source, None) or _parse_hub_name(source)
            dataset = datasets.load_dataset(name, config, split=split)
    except CalibrationError:
        raise
    except Exception as exc:  # datasets raises many kinds; the user needs one line
        hint = "" if path.exists() else " (offline or unknown hub name? pass a local txt/jsonl/parquet file or folder)"
        raise CalibrationError(f"cannot read text from '{source}'{hint}: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if "text" not in dataset.column_names:
        raise CalibrationError(f"'{source}' has no 'text' column (columns: {', '.join(dataset.column_names)})")
    pieces, size = [], 0
    for text in dataset["text"]:
        if text:
            pieces.append(text if max_chars is None else text[:max_chars - size])
            size += len(pieces[-1])
            if max_chars is not None and size >= max_chars:
                break
    if not pieces:
        raise CalibrationError(f"'{source}' holds no text")
    return "\n\n".join(pieces)


def _parse_hub_name(source: str) -> tuple[str, str | None, str]:
    name, _, rest = source.partition(":")
    config, _, split = rest.partition(":")
    return name, config or None, split or "train"


def _load_local(path: Path):
    import datasets

    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise CalibrationError(f"no .txt, .jsonl or .parquet files in {path}")
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if None in builders or len(builders) > 1:
        raise CalibrationError(f"{path}: use files of one kind: .txt, .jsonl or .parquet")
    builder = builders.pop()
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)


def sample_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) token ids: windows at random offsets of the tokenized text, drawn with `seed`."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen:
        raise CalibrationError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[start: start + seqlen] for start in starts])
