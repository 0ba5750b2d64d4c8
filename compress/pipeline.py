"""The sequential pipeline: calibrate, then for each decoder block capture, compress its linears, propagate."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration import block_linears, capture_block_inputs, find_blocks, load_text, record_grams, run_block, sample_windows
from calibration.data import CalibrationError
from compress.allocate import uniform_ranks
from compress.errors import CompressError
from compress.factorize.svd import factorize_svd
from compress.factorize.svd_llm import factorize_svd_llm
from compress.layer import CompressedLinear
from compress.linalg import output_error
from compress.models import DEMO_DIR, load_model
from compress.quantize.rtn import quantize_rtn
from compress.recipe import Factorize, Quantize, Recipe
from kernels.grid import QuantizedWeight, resolve_group_size

DEFAULT_CALIBRATION = DEMO_DIR / "calibration.txt"


@dataclass
class Compressed:
    """A compressed model in memory, with what made it and what was measured."""

    model: nn.Module
    tokenizer: object
    recipe: Recipe
    report: dict
    base_model: str


def compress_model(model: nn.Module | str, recipe: Recipe, calib: str | Path | torch.Tensor | None = None,
                   tokenizer=None, progress: bool = True) -> Compressed:
    """Compress `model` (a model, alias, hub id or directory) in place as `recipe` says.

    calib: token ids (nsamples, seqlen), or a text source overriding recipe.calibration.source.
    """
    start = time.time()
    base_model = model if isinstance(model, str) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, str):
        model, tokenizer, base_model = load_model(model)
    prefix, blocks = find_blocks(model)
    targets = select_linears(prefix, blocks, recipe)
    shapes = {name: (layer.out_features, layer.in_features) for block in targets for name, layer in block.items()}
    ranks = uniform_ranks(shapes, recipe.factorize.rank_budget) if recipe.factorize else {}
    if recipe.quantize:
        check_group_size(recipe.quantize.group_size, shapes, ranks)
    input_ids = calibration_ids(model, tokenizer, recipe, calib)

    hidden, block_kwargs = capture_block_inputs(model, blocks[0], input_ids)
    fp_hidden = hidden  # the full-precision stream, beside the compressed one
    layers, block_errors, notes = {}, [], []
    for index, block in enumerate(tqdm(blocks, desc="compressing", unit="block", disable=not progress)):
        with record_grams(targets[index]) as grams:
            run_block(block, hidden, block_kwargs)
        fp_hidden = run_block(block, fp_hidden, block_kwargs)
        for name, linear in targets[index].items():
            layer, layers[name] = compress_linear(name, linear, grams[name].gram, ranks.get(name), recipe, notes)
            model.set_submodule(name, layer)
        hidden = run_block(block, hidden, block_kwargs)
        block_errors.append(((hidden - fp_hidden).norm() / fp_hidden.norm()).item())

    stored = sum(model.get_submodule(name).stored_bits() for name in layers)
    dense = sum(out * inp for out, inp in shapes.values())
    report = {
        "base_model": base_model,
        "bits_per_weight": stored / dense,
        "compressed_parameters": dense,
        "calibration": {"tokens": input_ids.numel(), "nsamples": input_ids.shape[0], "seqlen": input_ids.shape[1]},
        "block_output_error": block_errors,
        "layers": layers,
        "notes": notes,
        "seconds": round(time.time() - start, 2),
    }
    return Compressed(model, tokenizer, recipe, report, base_model)


def select_linears(prefix: str, blocks: nn.ModuleList, recipe: Recipe) -> list[dict[str, nn.Linear]]:
    """Per block, {full module name: linear} of the layers to compress (recipe include / exclude regexes)."""
    selected = []
    for index, block in enumerate(blocks):
        named = {f"{prefix}.{index}.{local}": layer for local, layer in block_linears(block).items()}
        selected.append({name: layer for name, layer in named.items()
                         if (not recipe.include or any(re.search(p, name) for p in recipe.include))
                         and not any(re.search(p, name) for p in recipe.exclude)})
    if not any(selected):
        raise CompressError("no linear layer matches the recipe's include / exclude patterns")
    return selected


def check_group_size(group_size: int, shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> None:
    """Refuse a group size that divides none of the tensors to quantize (their input widths)."""
    widths = {w for name, (_, inp) in shapes.items() for w in ((ranks[name], inp) if ranks else (inp,))}
    if group_size > 0 and not any(width % group_size == 0 for width in widths):
        raise CompressError(f"group size {group_size} divides no layer (input widths: "
                            f"{', '.join(map(str, sorted(widths)))}); choose one that does, or 0 for one group per row")


def calibration_ids(model: nn.Module, tokenizer, recipe: Recipe, calib) -> torch.Tensor:
    """The (nsamples, seqlen) calibration windows the recipe asks for."""
    if isinstance(calib, torch.Tensor):
        return calib
    settings = recipe.calibration
    seqlen = settings.seqlen or min(2048, getattr(model.config, "max_position_embeddings", 2048))
    source = calib or settings.source or DEFAULT_CALIBRATION
    if tokenizer is None:
        raise CompressError("a tokenizer is needed to build calibration windows from text")
    budget = 4 * settings.nsamples * seqlen * 8  # characters: plenty for the windows, bounded for big corpora
    try:
        return sample_windows(tokenizer, load_text(source, max_chars=budget), settings.nsamples, seqlen, settings.seed)
    except CalibrationError as exc:
        raise CompressError(str(exc)) from None


def compress_linear(name: str, linear: nn.Linear, gram: torch.Tensor, rank: int | None, recipe: Recipe,
                    notes: list[str]) -> tuple[CompressedLinear, dict]:
    """Factorize and/or quantize one linear; returns the layer and its report entry."""
    weight = linear.weight.detach().float()
    info: dict = {"shape": list(weight.shape)}
    base = up = down = None
    if recipe.factorize:
        lowrank, info["damp"] = factorize(weight, gram, rank, recipe.factorize)
        up, down = lowrank.up, lowrank.down
        info["rank"] = rank
    else:
        base = weight
    if recipe.quantize:
        quantized = {part: quantize(tensor, recipe.quantize, f"{name}.{part}", notes)
                     for part, tensor in (("base", base), ("up", up), ("down", down)) if tensor is not None}
        base, up, down = (quantized.get(part) for part in ("base", "up", "down"))
        info["bits"] = recipe.quantize.bits
        info["group_size"] = {part: q.group_size for part, q in quantized.items()}
    # Dense factors are stored in fp16: cast now so that the model in memory is the one written.
    up, down = (t.half() if isinstance(t, torch.Tensor) else t for t in (up, down))
    bias = None if linear.bias is None else linear.bias.detach().clone()
    layer = CompressedLinear.from_parts(base, up, down, bias)
    info["relative_error"] = output_error(weight, layer.weight_approx(), gram)
    return layer, info


def factorize(weight: torch.Tensor, gram: torch.Tensor, rank: int, stage: Factorize):
    """(LowRank, damping) by the stage's method."""
    if stage.method == "svd":
        return factorize_svd(weight, rank), 0.0
    return factorize_svd_llm(weight, gram, rank)


def quantize(tensor: torch.Tensor, stage: Quantize, name: str, notes: list[str]) -> QuantizedWeight:
    group_size = resolve_group_size(tensor.shape[1], stage.group_size)
    if stage.group_size and group_size != stage.group_size:
        notes.append(f"{name}: group size {stage.group_size} does not divide {tensor.shape[1]}, used {group_size}")
    return quantize_rtn(tensor.float(), stage.bits, group_size, stage.symmetric)
