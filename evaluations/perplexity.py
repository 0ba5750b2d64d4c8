"""Perplexity over non-overlapping windows of a text (the GPTQ / SVD-LLM protocol)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from calibration import load_text
from compress.models import DEMO_DIR, cache_root

DEMO_HELDOUT = DEMO_DIR / "heldout.txt"


def eval_text(source: str | Path) -> str:
    """`demo` (the bundled held-out text), a local file or folder, or a `datasets` name such as wikitext2."""
    return DEMO_HELDOUT.read_text() if str(source) == "demo" else load_text(source)


def default_seqlen(model) -> int:
    return min(2048, getattr(model.config, "max_position_embeddings", 2048))


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int, batch_size: int = 8, progress: bool = True) -> float:
    """exp of the mean next-token loss over the floor(len / seqlen) full windows of a 1-D token sequence."""
    windows = len(input_ids) // seqlen
    if windows == 0:
        raise ValueError(f"the text has {len(input_ids)} tokens, fewer than one window of {seqlen}")
    ids = input_ids[: windows * seqlen].view(windows, seqlen)
    device = next(model.parameters()).device
    total = 0.0
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = ids[start: start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += loss.item()
    return math.exp(total / (windows * (seqlen - 1)))


def text_perplexity(model, tokenizer, source: str | Path, seqlen: int | None = None, progress: bool = True) -> dict:
    """{'perplexity', 'source', 'seqlen', 'tokens'} of a model on a text source."""
    seqlen = seqlen or default_seqlen(model)
    ids = torch.tensor(tokenizer(eval_text(source), add_special_tokens=False, verbose=False)["input_ids"],
                       dtype=torch.long)
    return {"perplexity": perplexity(model, ids, seqlen, progress=progress), "source": str(source),
            "seqlen": seqlen, "tokens": (len(ids) // seqlen) * seqlen}


def cached_perplexity(model_dir: str | Path, source: str | Path, evaluate: Callable[[], dict]) -> dict:
    """evaluate() (a text_perplexity of the uncompressed model in `model_dir` on `source`), kept under
    cache_root()/perplexity and reused while the model's files (names, sizes, modification times), the text and
    torch's version are the same: every run on one model would otherwise score the same original again. A model
    that is not a local directory (a hub id) is evaluated every time."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return evaluate()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.iterdir() if f.is_file())
    text = DEMO_HELDOUT if str(source) == "demo" else Path(source).expanduser()
    text_key = text.read_bytes() if text.is_file() else str(source).encode()  # a hub name or a folder: its name
    key = hashlib.sha256(json.dumps([str(model_dir.resolve()), files, torch.__version__]).encode()
                         + hashlib.sha256(text_key).digest()).hexdigest()[:24]
    path = cache_root() / "perplexity" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = evaluate()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result))
    temporary.replace(path)
    return result
