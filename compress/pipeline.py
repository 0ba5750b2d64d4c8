"""The sequential pipeline: calibrate, then for each decoder block capture, compress its linears, propagate."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration import block_linears, capture_block_inputs, find_blocks, load_text, paired_statistics, run_block, sample_windows
from calibration.data import CalibrationError
from compress.allocate import lorap_attention_ranks, uniform_ranks, welore_ranks
from compress.errors import CompressError
from compress.factorize.eora import factorize_eora
from compress.factorize.lorap import factorize_awsvd
from compress.factorize.saes_svd import factorize_saes
from compress.factorize.svd import factorize_svd
from compress.factorize.svd_llm import factorize_svd_llm
from compress.layer import CompressedLinear
from compress.linalg import LowRank, nonfinite_count, output_error
from compress.models import DEMO_DIR, load_model, resolve_model
from compress.prune import channel_scores, channels_to_keep, prune_mlp_weights
from compress.quantize.cbq import CBQConfig, quantize_window_cbq, windows
from compress.quantize.gptq import quantize_gptq
from compress.quantize.lrq import LRQConfig, quantize_block_lrq
from compress.quantize.rtn import quantize_rtn
from compress.recipe import Compensate, Factorize, Quantize, Recipe
from compress.streaming import Shards, Stream, empty_model, has_shards, work_directory
import kernels
from kernels.grid import QuantizedWeight, resolve_group_size

DEFAULT_CALIBRATION = DEMO_DIR / "calibration.txt"
# Leaf names of the projections in Llama-family blocks (Llama, Mistral, Qwen2): what LoRAP treats differently.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Compressed:
    """A compressed model in memory, with what made it and what was measured."""

    model: nn.Module
    tokenizer: object
    recipe: Recipe
    report: dict
    base_model: str


# Compressed blocks propagate the calibration streams through the float32 reference matmul: the same numbers on every
# device, whatever kernels serve the model later.
@kernels.forced("reference")
def compress_model(model: nn.Module | str, recipe: Recipe, calib: str | Path | torch.Tensor | None = None,
                   tokenizer=None, progress: bool = True, bases: dict[str, torch.Tensor] | None = None,
                   stream: Stream | None = None) -> Compressed:
    """Compress `model` (a model, alias, hub id or directory) in place as `recipe` says.

    calib: token ids (nsamples, seqlen), or a text source overriding recipe.calibration.source.
    bases: {module name: weight (out, in)} already quantized by someone else (their dequantized values): only
    those layers are touched, each becoming base + the recipe's compensation.
    stream: run block by block from a checkpoint's shards (`model` is then `streaming.empty_model`), each finished
    block written to the stream's checkpoints and freed; see `compress_to_directory`.
    """
    if recipe.compensate and not recipe.quantize and bases is None:
        raise CompressError("compensation needs a quantized base: give --wbits, or run `compress compensate` on a "
                            "quantized checkpoint")
    start = time.time()
    base_model = model if isinstance(model, str) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, str):
        model, tokenizer, base_model = load_model(model)
    prefix, blocks = find_blocks(model)
    targets = select_linears(prefix, blocks, recipe)
    if bases is not None:
        missing = sorted(set(bases) - {name for block in targets for name in block})
        if missing:
            raise CompressError(f"the quantized checkpoint has layers the model lacks or the recipe excludes: {missing[:3]}")
        targets = [{name: layer for name, layer in block.items() if name in bases} for block in targets]
    shapes = {name: (layer.out_features, layer.in_features) for block in targets for name, layer in block.items()}
    weight_of = stream.weight if stream else (lambda name: model.get_submodule(name).weight.detach())
    plan = allocate(recipe.factorize, targets, shapes, weight_of) if recipe.factorize else Plan({}, set())
    if recipe.quantize:
        check_group_size(recipe.quantize.group_size, shapes, plan.ranks)
    input_ids = calibration_ids(model, tokenizer, recipe, calib)
    notes = calibration_notes(input_ids)
    cross = recipe.factorize is not None and recipe.factorize.method == "saes-svd"
    learning = recipe.quantize.method if recipe.quantize and recipe.quantize.method in ("lrq", "cbq") else None
    resumed = stream.start(input_ids, recipe, len(blocks)) if stream else 0

    if stream:
        stream.fill_outside(model, prefix)
    # A resumed run needs only the blocks' keyword arguments (RoPE, mask): one window gives them.
    ids = input_ids[:1] if resumed else input_ids
    hidden, block_kwargs = capture_block_inputs(model, blocks[0], ids.to(stream.device) if stream else ids)
    if stream:
        stream.release_outside(model, prefix)
        hidden, block_kwargs = stream.place(hidden, block_kwargs)
    fp_hidden = hidden  # the full-precision stream, beside the compressed one
    pending: dict[int, dict[str, QuantizedWeight]] = {}  # CBQ: blocks learnt in a window, not yet replaced
    if resumed:
        hidden, fp_hidden, pending = stream.carried(resumed - 1)
    check_finite(hidden, "the calibration inputs of the first block")
    layers, block_errors, block_seconds = {}, [], []
    if learning == "cbq":
        cbq = cbq_config(recipe.quantize)
        window_at = {window.start: window for window in windows(len(blocks), cbq.window, cbq.overlap)}
    for index, block in enumerate(tqdm(blocks, desc="compressing", unit="block", disable=not progress)):
        if index < resumed:  # finished by the interrupted run: its record, and its layers' shapes on meta
            record = stream.restore(model, index)
            layers.update(record["layers"])
            block_errors.append(record["block_output_error"])
            block_seconds.append(record["seconds"])
            notes += record["notes"]
            continue
        block_start, notes_before = time.time(), len(notes)
        if stream:
            for later in (window_at[index] if learning == "cbq" and index in window_at else [index]):
                stream.fill(blocks[later], f"{prefix}.{later}")
        stats, fp_hidden = paired_statistics(block, targets[index], hidden, fp_hidden, block_kwargs, cross=cross)
        weights = {name: linear.weight.detach().float() for name, linear in targets[index].items()}
        grams = {name: stat.gram for name, stat in stats.items()}
        pruned = [name for name in targets[index] if name in plan.pruned]
        if pruned:  # LoRAP removes the same share of MLP channels in every block
            kept = prune_mlp(weights, grams, pruned, 1 - recipe.factorize.rank_budget)
            model.config.intermediate_size = kept
        # LRQ and CBQ learn the quantized weights of a block (CBQ: of a window of blocks) from both streams at once
        if learning == "lrq":
            pending[index] = quantize_block_lrq(block, targets[index], hidden, fp_hidden, block_kwargs,
                                                lrq_config(recipe.quantize))
        elif learning == "cbq" and index in window_at:
            pending.update(learn_cbq_window(blocks, targets, window_at[index], hidden, fp_hidden, block_kwargs, cbq))
        learned = pending.pop(index, {})
        names = list(targets[index])
        for name in names:  # each layer's statistics, and its original weight, are dropped once it is done
            linear = targets[index].pop(name)
            bias = None if linear.bias is None else linear.bias.detach().clone()
            given = learned.get(name) if bases is None else bases[name]
            layer, layers[name] = compress_linear(name, weights.pop(name), bias, grams.pop(name), stats.pop(name).cross,
                                                  plan.ranks.get(name), recipe, notes, given)
            layers[name]["shape"] = list(linear.weight.shape)
            if name in plan.pruned:
                layers[name]["channels_kept"] = kept
            model.set_submodule(name, layer)
        hidden = run_block(block, hidden, block_kwargs)
        check_finite(hidden, f"the outputs of block {index} on the calibration windows")
        block_errors.append(stream_error(hidden, fp_hidden))
        block_seconds.append(round(time.time() - block_start, 2))
        if stream:
            stream.finish(model, f"{prefix}.{index}", index, hidden, fp_hidden, {
                "layers": {name: layers[name] for name in names}, "block_output_error": block_errors[-1],
                "seconds": block_seconds[-1], "notes": notes[notes_before:],
                "intermediate_size": model.config.intermediate_size if pruned else None}, pending)

    stored = sum(model.get_submodule(name).stored_bits() for name in layers)
    dense = sum(out * inp for out, inp in shapes.values())
    report = {
        "base_model": base_model,
        "bits_per_weight": stored / dense,
        "compressed_parameters": dense,
        "calibration": {"tokens": input_ids.numel(), "nsamples": input_ids.shape[0], "seqlen": input_ids.shape[1]},
        "block_output_error": block_errors,
        "block_seconds": block_seconds,
        "layers": layers,
        "notes": notes,
        "seconds": round(time.time() - start, 2),
    }
    return Compressed(model, tokenizer, recipe, report, base_model)


def compress_to_directory(model: str, recipe: Recipe, out: str | Path, calib: str | Path | torch.Tensor | None = None,
                          device: str | None = None, offload: bool = False, resume: bool = False,
                          overwrite: bool = False, progress: bool = True, extras=None) -> Compressed:
    """Compress a checkpoint (alias, hub id or directory with safetensors) block by block into `out`.

    Only one block is in memory at a time; each finished block is checkpointed in `.OUT.partial`, and `resume`
    continues an interrupted run from there. device: where blocks compute (default cuda when available);
    offload: keep the calibration activations on the CPU in half precision (else float32).
    extras(directory, compressed) may add files to the output before it is moved into place.
    """
    from compress.formats.native import check_out, save_streamed

    out = Path(out)
    work = work_directory(out)
    if not resume or not work.exists():
        check_out(out, overwrite)  # resuming into an existing --out is fine: it is replaced only at the end
    device = compute_device(device)
    directory = checkpoint_directory(model)
    shards = Shards(directory)
    try:
        empty = empty_model(directory)
        tokenizer = None
        if not isinstance(calib, torch.Tensor):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CompressError(f"cannot load the model's config or tokenizer from {directory}: "
                            f"{str(exc).splitlines()[0]}") from None
    storage = empty.config.dtype if isinstance(empty.config.dtype, torch.dtype) else getattr(torch, str(empty.config.dtype))
    activation = (torch.float16 if storage == torch.float32 else storage) if offload else torch.float32
    stream = Stream(shards, work, device, activation, storage, resume, overwrite)
    compressed = compress_model(empty, recipe, calib, tokenizer, progress, stream=stream)
    compressed.base_model = compressed.report["base_model"] = model if model == "demo" else directory
    files = stream.write_outside(compressed.model, find_blocks(compressed.model)[0])
    # A resumed run may replace the --out that its first run was allowed to replace. The bookkeeping goes only once
    # the output is complete (metadata and extras written): until then the run can still be resumed.
    save_streamed(compressed, stream.work, out, files, overwrite or resume,
                  None if extras is None else lambda directory: extras(directory, compressed), stream.checkpoints.clean)
    return compressed


def compute_device(device: str | None) -> torch.device:
    """The device blocks compute on (default cuda when available), refused with one line if this machine lacks it."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise CompressError(f"device '{device}' is not usable here: {str(exc).splitlines()[0]}") from None
    return device


def checkpoint_directory(model: str) -> str:
    """The local directory of an alias, directory or hub id (downloaded, or from the cache when offline)."""
    resolved = resolve_model(model)
    if Path(resolved).is_dir():
        directory = resolved
    else:
        from huggingface_hub import snapshot_download

        try:
            directory = snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
        except Exception:  # noqa: BLE001 - every hub failure gets the same advice
            raise CompressError(f"cannot load '{resolved}' from the hugging face hub (offline, not cached, gated or "
                                "misspelled): download it elsewhere and pass its local directory with --model DIR") from None
    if not has_shards(directory):
        raise CompressError(f"{directory} has no safetensors weights: streaming needs model.safetensors or shards "
                            "with an index (convert the checkpoint with save_pretrained)")
    return directory


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN or Inf in calibration activations: every statistic and weight after it would be garbage."""
    bad = nonfinite_count(tensor)
    if bad:
        raise CompressError(f"{what} hold {bad} NaN/Inf values (overflow in half precision? a broken checkpoint?); "
                            "nothing was written")


def stream_error(hidden: torch.Tensor, fp_hidden: torch.Tensor, windows: int = 8) -> float:
    """||hidden - fp_hidden|| / ||fp_hidden|| over the calibration windows, a few windows at a time: float32 copies
    of whole half-precision streams (--offload) would be twice their size each."""
    num = den = 0.0
    for compressed, reference in zip(hidden.split(windows), fp_hidden.split(windows)):
        reference = reference.float()
        num += (compressed.float() - reference).square().sum().item()
        den += reference.square().sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def calibration_notes(input_ids: torch.Tensor) -> list[str]:
    """Report windows that are one token repeated (padding, an empty document): they add little information."""
    constant = [i for i, window in enumerate(input_ids) if (window == window[0]).all()]
    return [f"calibration windows {constant[:8]} are one token repeated" + (" ..." if len(constant) > 8 else "")] if constant else []


@dataclass(frozen=True)
class Plan:
    """What the allocator decided: a rank per layer (None: stays dense) and the MLP layers to prune (LoRAP)."""

    ranks: dict[str, int | None]
    pruned: set[str]


def allocate(stage: Factorize, targets: list[dict[str, nn.Linear]], shapes: dict[str, tuple[int, int]],
             weight_of: Callable[[str], torch.Tensor]) -> Plan:
    """Per-layer ranks for the stage's budget and allocator; shapes: {name: (out, in)}; weight_of(name): its weight."""
    if stage.allocate == "uniform":
        return Plan(uniform_ranks(shapes, stage.rank_budget), set())
    if stage.allocate == "welore":
        spectra = {name: torch.linalg.svdvals(weight_of(name).double()) for block in targets for name in block}
        try:
            return Plan(welore_ranks(spectra, shapes, stage.rank_budget), set())
        except ValueError as exc:
            raise CompressError(str(exc)) from None
    ranks, pruned = {}, set()
    for block in targets:
        leaves = {name.rsplit(".", 1)[-1]: name for name in block}
        if not set(ATTENTION) | set(MLP) <= set(leaves):
            raise CompressError(f"lorap needs every attention and MLP projection of a block ({', '.join(ATTENTION + MLP)})")
        attention = lorap_attention_ranks({leaf: shapes[leaves[leaf]] for leaf in ATTENTION}, stage.rank_budget)
        ranks.update({leaves[leaf]: rank for leaf, rank in attention.items()})
        ranks.update({leaves[leaf]: None for leaf in MLP})
        pruned.update(leaves[leaf] for leaf in MLP)
    return Plan(ranks, pruned)


def prune_mlp(weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], names: list[str], fraction: float) -> int:
    """LoRAP's structured pruning of one MLP, in place on `weights` and `grams`; returns the channels kept.

    The kept count is rounded down to a multiple of 32, so that quantization groups still divide down_proj's
    input (a prime width would leave groups of one column)."""
    gate, up, down = (next(n for n in names if n.endswith(leaf)) for leaf in MLP)
    input_norm, inter_norm = (grams[n].diagonal().clamp(min=0).sqrt().float() for n in (gate, down))
    scores = channel_scores(weights[gate], weights[up], weights[down], input_norm, inter_norm)
    channels = len(scores)
    kept = max(32, int(channels * (1 - fraction)) // 32 * 32) if channels >= 64 else channels - int(channels * fraction)
    keep = channels_to_keep(scores, (channels - kept) / channels)
    weights[gate], weights[up], weights[down] = prune_mlp_weights(weights[gate], weights[up], weights[down], keep)
    grams[down] = grams[down][keep][:, keep]
    return len(keep)


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


def check_group_size(group_size: int, shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> None:
    """Refuse a group size that divides none of the tensors to quantize (their input widths)."""
    widths = {w for name, (_, inp) in shapes.items() for w in ((inp,) if ranks.get(name) is None else (ranks[name], inp))}
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


def compress_linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor,
                    cross: torch.Tensor | None, rank: int | None, recipe: Recipe, notes: list[str],
                    given_base: torch.Tensor | QuantizedWeight | None = None) -> tuple[CompressedLinear, dict]:
    """Factorize (rank given) and/or quantize one weight (out, in), or take a given base (someone else's dequantized
    weight, or one a block-level quantizer learned), then compensate; returns the layer and its report entry."""
    info: dict = {}
    bad = nonfinite_count(weight)
    if bad:
        raise CompressError(f"{name}: the weight holds {bad} NaN/Inf values; a broken checkpoint cannot be compressed")
    dead = (gram.diagonal() == 0).sum().item()
    if dead:
        notes.append(f"{name}: {dead} of {len(gram)} input channels were never active in calibration (damped)")
    base = up = down = None
    if recipe.factorize and rank is not None:
        lowrank, details = factorize(weight, gram, cross, rank, recipe.factorize)
        up, down = lowrank.up, lowrank.down
        info.update(rank=rank, **details)
    else:
        base = weight if given_base is None else given_base
    if recipe.quantize:
        quantized = {}
        if isinstance(given_base, QuantizedWeight):
            quantized["base"] = given_base
        elif base is not None:
            quantized["base"] = quantize(base, gram, recipe.quantize, f"{name}.base", notes)
        else:  # the factor `up` sees the input `down @ x`, whose Gram is down G down^T (down as quantized)
            quantized["down"] = quantize(down, gram, recipe.quantize, f"{name}.down", notes)
            quantized["up"] = quantize(up, factor_gram(quantized["down"], gram, recipe.quantize), recipe.quantize,
                                       f"{name}.up", notes)
        base, up, down = (quantized.get(part) for part in ("base", "up", "down"))
        info["bits"] = recipe.quantize.bits
        info["group_size"] = {part: q.group_size for part, q in quantized.items()}
    if recipe.compensate:
        up, down = compensate(weight, base, gram, recipe.compensate, recipe.quantize, name, notes)
        info["rank"] = down.shape[0]
    # Dense parts are stored in fp16: cast now so that the model in memory is the one written. A given base
    # stays exact: it stands for someone else's quantized tensors, which are kept as they are.
    up, down = (t.half() if isinstance(t, torch.Tensor) else t for t in (up, down))
    if given_base is None and isinstance(base, torch.Tensor):
        base = base.half()
    layer = CompressedLinear.from_parts(base, up, down, bias)
    approx = layer.weight_approx()
    if nonfinite_count(approx):
        raise CompressError(f"{name}: the compressed weight is not finite (weights beyond the fp16 range of the scales, "
                            "or degenerate calibration statistics); nothing was written")
    info["relative_error"] = output_error(weight, approx, gram)
    return layer, info


def learn_cbq_window(blocks: nn.ModuleList, targets: list[dict[str, nn.Linear]], window: range, hidden: torch.Tensor,
                     fp_out: torch.Tensor, block_kwargs: dict, config: CBQConfig) -> dict[int, dict[str, QuantizedWeight]]:
    """CBQ on the window that starts at the current block: `hidden` is its compressed-stream input, `fp_out` the
    full-precision output of its first block (the later ones are still uncompressed and run here)."""
    fp_target = fp_out
    for index in window[1:]:
        fp_target = run_block(blocks[index], fp_target, block_kwargs)
    results = quantize_window_cbq([blocks[i] for i in window], [targets[i] for i in window], hidden, fp_target,
                                  block_kwargs, config)
    return dict(zip(window, results))


def cbq_config(stage: Quantize) -> CBQConfig:
    return CBQConfig(bits=stage.bits, group_size=stage.group_size, symmetric=stage.symmetric, rank=stage.rank or 5,
                     iterations=stage.iterations, lr=stage.lr, window=stage.window, overlap=stage.overlap, seed=stage.seed)


def lrq_config(stage: Quantize) -> LRQConfig:
    return LRQConfig(bits=stage.bits, group_size=stage.group_size, symmetric=stage.symmetric, rank=stage.rank or 16,
                     iterations=stage.iterations, lr=stage.lr, seed=stage.seed)


def compensate(weight: torch.Tensor, base: torch.Tensor | QuantizedWeight, gram: torch.Tensor, stage: Compensate,
               quantizer: Quantize | None, name: str = "layer", notes: list[str] | None = None):
    """Low-rank factors (up, down) of the error weight - base; quantized per output channel when asked."""
    error = weight.float() - (base.dequantize() if isinstance(base, QuantizedWeight) else base.float())
    rank = min(stage.rank, *error.shape)
    lowrank = factorize_svd(error, rank) if stage.method == "lorc" else factorize_eora(error, gram, rank)
    if stage.factor_bits is None:
        return lowrank.up, lowrank.down
    gptq = quantizer is not None and quantizer.method == "gptq"
    per_channel = Quantize(method="gptq" if gptq else "rtn", bits=stage.factor_bits, group_size=0, symmetric=False,
                           damp=quantizer.damp if gptq else Quantize.damp)
    notes = [] if notes is None else notes
    down = quantize(lowrank.down, gram, per_channel, f"{name}.compensation.down", notes)
    return quantize(lowrank.up, factor_gram(down, gram, per_channel), per_channel, f"{name}.compensation.up", notes), down


def factor_gram(down: QuantizedWeight, gram: torch.Tensor, stage: Quantize) -> torch.Tensor | None:
    """The Gram of `up`'s input `down @ x`: down G down^T (down as quantized); None for RTN, which reads no Gram."""
    if stage.method == "rtn":
        return None
    down = down.dequantize(torch.float64)
    return down @ gram.double() @ down.T


def factorize(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None, rank: int,
              stage: Factorize) -> tuple[LowRank, dict]:
    """The stage's factorization of one weight, and what it chose (damping, beta) for the report."""
    if stage.method == "svd":
        return factorize_svd(weight, rank), {}
    if stage.method == "svd-llm":
        lowrank, damp = factorize_svd_llm(weight, gram, rank)
        return lowrank, {"damp": damp}
    if stage.method == "saes-svd":
        lowrank, beta, damp = factorize_saes(weight, gram, cross, rank, stage.beta, stage.beta_max, stage.beta_min)
        return lowrank, {"beta": beta, "damp": damp}
    if stage.method == "eora":
        return factorize_eora(weight, gram, rank), {}
    return factorize_awsvd(weight, gram, rank), {}  # lorap's attention half


def quantize(tensor: torch.Tensor, gram: torch.Tensor | None, stage: Quantize, name: str, notes: list[str]) -> QuantizedWeight:
    """The stage's quantizer on one tensor (out, in) whose inputs have Gram `gram` (in, in; RTN reads none)."""
    group_size = resolve_group_size(tensor.shape[1], stage.group_size)
    if stage.group_size and group_size != stage.group_size:
        notes.append(f"{name}: group size {stage.group_size} does not divide {tensor.shape[1]}, used {group_size}")
    if stage.method == "rtn":
        return quantize_rtn(tensor.float(), stage.bits, group_size, stage.symmetric)
    try:
        quantized, info = quantize_gptq(tensor.float(), gram, stage.bits, group_size, stage.symmetric, stage.act_order,
                                        stage.static_groups, stage.damp)
    except ValueError as exc:
        raise CompressError(f"{name}: {exc}") from None
    if info.damp_raised:
        notes.append(f"{name}: GPTQ damping raised from {stage.damp:g} to {info.damp:g} of the mean diagonal (Cholesky failed)")
    return quantized
