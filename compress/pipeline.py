"""The sequential pipeline: calibrate, then for each decoder block capture, compress its linears, propagate."""
from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration import Replays, group_statistics, load_text, run_block, sample_windows
from calibration.capture import block_device
from calibration.data import CalibrationError
from compress.architectures import Architecture, architecture
from compress.blocks import InMemoryBlocks, StreamedBlocks
from compress import distributed
from compress.errors import CompressError
from compress.layer import CompressedLinear
from compress.factorize.saes_svd import SAES
from compress.linalg import GRAM_DTYPES, gram_dtypes, memory_bytes, nonfinite_count
from compress.models import DEMO_DIR, load_model, resolve_model
from compress.quantize import LearnedConfig
from compress.quantize.gptq import GPTAQ
from compress.recipe import Recipe
from compress.search import Form, form_configs, plan_forms
from compress.stages import LearnedQuantizer, Plan, allocate, compress_linear, prune_mlp
from compress.streaming import Shards, empty_model, has_shards, work_directory

DEFAULT_CALIBRATION = DEMO_DIR / "calibration.txt"
# windows of the full-precision stream kept where no method reads it (only the block output error does)
REFERENCE_WINDOWS = 4
# replayed outputs may take at most 1 / REPLAY_SHARE of the memory (a 70B block's attention at 32 x 512 would not)
REPLAY_SHARE = 64
# compressed layers keep dequantized float32 copies for the block's capture passes where the block's copies take at
# most this share of the memory (an 8B block: 0.8 GiB; a 405B block's, 12 GiB, would not fit beside its solves)
DENSE_SHARE = 16


@dataclass
class Compressed:
    """A compressed model in memory, with what made it and what was measured."""

    model: nn.Module
    tokenizer: object
    recipe: Recipe
    report: dict
    base_model: str


def compress_model(model: nn.Module | str, recipe: Recipe, calib: str | Path | torch.Tensor | None = None,
                   tokenizer=None, progress: bool = True, bases: dict[str, torch.Tensor] | None = None,
                   source: InMemoryBlocks | StreamedBlocks | None = None, kernel: str = "reference") -> Compressed:
    """Compress `model` (a model, alias, hub id or directory) in place as `recipe` says.

    calib: token ids (nsamples, seqlen), or a text source overriding recipe.calibration.source.
    bases: {module name: weight (out, in)} already quantized by someone else (their dequantized values): only
    those layers are touched, each becoming base + the recipe's compensation.
    source: where the blocks come from (default: `model` in memory; StreamedBlocks: from a checkpoint's shards,
    `model` then being `streaming.empty_model`); see `compress_to_directory`.
    kernel: the matmul that propagates the calibration streams through compressed blocks (default the float32
    reference: the same numbers on every device, whatever kernels serve the model later).
    """
    if recipe.compensate and not recipe.quantize and bases is None:
        raise CompressError("compensation needs a quantized base: give --wbits, or run `compress compensate` on a "
                            "quantized checkpoint")
    start = time.time()
    base_model = model if isinstance(model, str) else getattr(model, "name_or_path", type(model).__name__)
    if isinstance(model, str):
        model, tokenizer, base_model = load_model(model)
    source = source or InMemoryBlocks()
    arch = architecture(model)
    blocks = model.get_submodule(arch.blocks)
    targets = select_linears(arch, blocks, recipe, bases)
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for block in targets for name in block}
    plan = allocate(recipe.factorize, arch, targets, shapes, lambda name: source.weight(model, name)) \
        if recipe.factorize else Plan({})
    if recipe.quantize and recipe.bpw is None:  # --bpw chooses group sizes per layer
        check_group_size(recipe.quantize.group_size, shapes, plan.ranks)
    input_ids = calibration_ids(model, tokenizer, recipe, calib)
    notes = calibration_notes(input_ids)
    world = distributed.world(getattr(source, "device", "cpu"))
    progress = progress and world.main
    search = None
    if recipe.bpw is not None and not recipe.forms:  # planned before the streams start: a resumed run plans alike
        planned, search = plan_forms(model, arch, source, targets, input_ids, recipe.bpw, recipe.quantize,
                                     recipe.compensate, progress)
        recipe = replace(recipe, forms={name: form.to_dict() for name, form in planned.items()})
    forms = layer_forms(recipe, targets)
    cross = isinstance(recipe.factorize, SAES) or isinstance(recipe.quantize, GPTAQ)  # both streams' statistics
    compensated = recipe.compensate or any(form.rank for form in forms.values())  # low-rank parts: float64 Grams
    product_dtype = torch.float64 if recipe.factorize or compensated else torch.float32
    # the same memory on every rank (the least), so that the ranks choose the same Gram dtypes
    memory = distributed.least(memory_bytes(getattr(source, "device", None) or next(model.parameters()).device), world)
    working = 2 if recipe.factorize or compensated else 1  # (n, n) copies beside the Grams while a layer is solved
    state = source.start(model, arch, distributed.shard(input_ids, world), recipe)
    hidden, fp_hidden, block_kwargs = state.hidden, state.fp_hidden, state.block_kwargs
    check_finite(hidden, "the calibration inputs of the first block")
    learner = LearnedQuantizer(recipe.quantize, len(blocks), state.pending) \
        if isinstance(recipe.quantize, LearnedConfig) else None
    if not (cross or learner) and len(hidden) > REFERENCE_WINDOWS:
        # the full-precision stream only measures the block output error here: a few windows estimate it, at a
        # fraction of a forward pass per block (a quarter of a GPTQ run's forwards on SmolLM2); a resumed run's
        # checkpointed stream holds those windows already
        fp_hidden = fp_hidden[:REFERENCE_WINDOWS]
        notes.append(f"block output errors measured on the first {REFERENCE_WINDOWS} calibration windows"
                     + (" of each rank" if world.size > 1 else ""))
    records = []
    for index in tqdm(range(len(blocks)), desc="compressing", unit="block", disable=not progress):
        if index < state.resumed:  # finished by the interrupted run: its record, and its layers' shapes on meta
            records.append(source.restore(model, index))
            continue
        started, prefix, block = time.time(), f"{arch.blocks}.{index}", blocks[index]
        source.load(model, arch, learner.window(index) if learner else range(index, index + 1))
        # LoRAP narrows the MLP first; `originals` hold what the full-precision stream runs through
        kept, originals = prune_mlp(block, arch, hidden, block_kwargs, 1 - recipe.factorize.rank_budget, world) \
            if plan.prune else (None, {})
        layers, fp_next, device = {}, None, block_device(block)
        # compressed layers keep dequantized copies while the block is calibrated, where they fit
        dense = kernel == "reference" and 4 * sum(math.prod(shapes[name]) for name in targets[index]) \
            <= memory // DENSE_SHARE
        replays = Replays(hidden.shape[0] * hidden.shape[1], memory / REPLAY_SHARE) \
            if recipe.true_sequential else None
        for step, groups in enumerate(capture_steps(arch, targets[index], prefix, recipe.true_sequential)):
            if replays:
                replays.add(final_modules(arch, block, targets[index], prefix, layers, hidden.shape[-1]))
            # the first capture runs the block as it came (its full-precision outputs); later ones see earlier
            # groups compressed, and for SAES's cross term run the full-precision stream with `originals` back
            dtypes = step_gram_dtypes(recipe.gram_dtype, block, groups, 2 if cross else 1, working, memory)
            if dense and torch.float32 in dtypes.values():  # memory is tight: from here on the compressed layers
                dense = False                                # dequantize on every call (70B's: 2.3 GiB of copies)
                keep_dense_copies(block, False)
            statistics, fp_out = group_statistics(block, groups, hidden, block_kwargs, fp_hidden if step == 0 or cross
                                                  else None, cross, fp_outputs=step == 0, originals=originals,
                                                  product_dtype=product_dtype, gram_dtypes=dtypes, replays=replays)
            shared = {id(t): t for found in statistics.values() for t in (found.gram, found.cross) if t is not None}
            distributed.sum_(list(shared.values()), world)  # once each: the linears of a group share one Gram
            del shared  # each Gram is freed once its group's layers are solved
            if step == 0:
                fp_next = fp_out
                given = bases or (learner.learn(blocks, targets, index, hidden, fp_out, block_kwargs, arch.blocks)
                                  if learner else {})

            def solve(local: str):
                name = f"{prefix}.{local}"
                rank, factorize, quantize, compensate = \
                    form_configs(forms[name], recipe.quantize, recipe.compensate) if forms else \
                    (plan.ranks.get(name), recipe.factorize, recipe.quantize, recipe.compensate)
                found = statistics.pop(local)
                layer, record = compress_linear(name, block.get_submodule(local), found, rank,
                                                factorize, quantize, compensate, given.get(name), kernel)
                if found.gram.dtype == torch.float32:
                    record.details["gram_dtype"] = "float32"
                    record.notes.append(f"{name}: input statistics kept in float32 ({len(found.gram)} wide, "
                                        f"--gram-dtype {recipe.gram_dtype})")
                if world.size == 1 and not cross:  # in place at once: the original's weight is freed before the next
                    block.set_submodule(local, layer)  # solve (a 70B down_proj's is 0.5 GiB in bf16)
                return (layer.cpu() if world.size > 1 else layer), record  # broadcast from the CPU: any rank's device

            locals_ = [local for group in groups for local in group]
            solved = distributed.share(locals_, [solve_cost(block.get_submodule(local)) for local in locals_], solve,
                                       world)
            for local, (layer, record) in zip(locals_, solved):
                name, linear = f"{prefix}.{local}", block.get_submodule(local)
                layer = layer.to(device)
                if forms:
                    record.details["form"] = forms[name].label
                record.channels_kept = kept if local in arch.mlp and plan.prune else None
                layers[name] = record
                if cross:
                    originals.setdefault(local, linear)
                if dense:  # the later captures and the block's outputs run through it several times
                    layer.keep_dense()
                block.set_submodule(local, layer)
        if fp_next is None:  # nothing targeted in this block: both streams run through it as it is
            fp_next = run_block(block, fp_hidden, block_kwargs)
        hidden, fp_hidden = run_block(block, hidden, block_kwargs, replays=replays), fp_next
        del replays
        keep_dense_copies(block, False)
        check_finite(hidden, f"the outputs of block {index} on the calibration windows")
        record = {"layers": {name: r.to_dict() for name, r in layers.items()},
                  "block_output_error": stream_error(hidden, fp_hidden, world=world),
                  "seconds": round(time.time() - started, 2),
                  "notes": [note for r in layers.values() for note in r.notes], "intermediate_size": kept}
        if kept:
            model.config.intermediate_size = kept
        records.append(record)
        source.finish(model, arch, index, record, hidden, fp_hidden, learner.pending if learner else {})

    for layer in model.modules():
        if hasattr(layer, "kernel"):
            layer.kernel = "auto"  # served by whatever kernels suit its device from now on
    report = make_report(model, base_model, input_ids, shapes, records, notes, start)
    if recipe.bpw is not None:
        report["bpw"] = search or {"budget": recipe.bpw, "replayed": True}
        report["bpw"]["met"] = report["bits_per_weight"]
    return Compressed(model, tokenizer, recipe, report, base_model)


def layer_forms(recipe: Recipe, targets: list[list[str]]) -> dict[str, Form]:
    """The recipe's per-layer forms ({} without), checked against the layers this run compresses."""
    if not recipe.forms:
        return {}
    names = [name for block in targets for name in block]
    missing, unknown = [n for n in names if n not in recipe.forms], sorted(set(recipe.forms) - set(names))
    if missing or unknown:
        raise CompressError(f"recipe.forms does not match the layers to compress: no form for {missing[:2] or 'none'},"
                            f" forms for layers not compressed {unknown[:2] or 'none'}")
    return {name: Form.from_dict(recipe.forms[name]) for name in names}


def step_gram_dtypes(choice: str, block: nn.Module, groups: list[tuple[str, ...]], per_gram: int, working: int,
                     memory: int) -> dict[str, torch.dtype]:
    """{each group's first linear: the dtype of its Gram} for one capture step: the recipe's gram_dtype, or with
    "auto" what compress.linalg.gram_dtypes chooses for the step's widths within `memory`."""
    widths = {group[0]: block.get_submodule(group[0]).in_features for group in groups}
    if choice != "auto":
        return {first: GRAM_DTYPES[choice] for first in widths}
    return gram_dtypes(widths, per_gram, working, memory)


def keep_dense_copies(block: nn.Module, keep: bool) -> None:
    """Whether the block's compressed layers keep dequantized copies of their parts (CompressedLinear.keep_dense):
    False frees those they hold."""
    for layer in block.modules():
        if isinstance(layer, CompressedLinear):
            layer.keep_dense(keep)


def final_modules(arch: Architecture, block: nn.Module, names: list[str], prefix: str, solved: dict,
                  hidden_size: int) -> dict[str, int]:
    """{module: output width} of the block's sublayers none of whose targeted linears is still to be compressed,
    then of its compressed linears (local names; `solved`: the full names of the compressed ones): what Replays
    may replay from now on."""
    pending = {name[len(prefix) + 1:] for name in names if name not in solved}
    sublayers = {sub: hidden_size for sub in arch.sublayers
                 if not any(local.startswith(sub + ".") for local in pending)}
    done = [name[len(prefix) + 1:] for name in names if name in solved]
    return sublayers | {local: block.get_submodule(local).out_features for local in done}


def capture_steps(arch: Architecture, names: list[str], prefix: str, true_sequential: bool) -> list[list[tuple]]:
    """The block's targeted linears (local names) as capture steps, each a list of groups that read one input:
    one step per data-flow group when true-sequential, else one step for all of them."""
    targeted = {name[len(prefix) + 1:] for name in names}
    groups = [tuple(local for local in group if local in targeted) for group in arch.groups]
    groups = [group for group in groups if group]
    return [[group] for group in groups] if true_sequential else [groups]


def make_report(model: nn.Module, base_model: str, input_ids: torch.Tensor, shapes: dict[str, tuple[int, int]],
                records: list[dict], notes: list[str], start: float) -> dict:
    layers = {name: entry for record in records for name, entry in record["layers"].items()}
    for name, entry in layers.items():
        entry["bits_per_weight"] = model.get_submodule(name).stored_bits() / math.prod(shapes[name])
    stored = sum(model.get_submodule(name).stored_bits() for name in layers)
    dense = sum(out * inp for out, inp in shapes.values())
    return {
        "base_model": base_model,
        "bits_per_weight": stored / dense,
        "compressed_parameters": dense,
        "calibration": {"tokens": input_ids.numel(), "nsamples": input_ids.shape[0], "seqlen": input_ids.shape[1]},
        "block_output_error": [record["block_output_error"] for record in records],
        "block_seconds": [record["seconds"] for record in records],
        "layers": layers,
        "notes": notes + [note for record in records for note in record["notes"]],
        "seconds": round(time.time() - start, 2),
    }


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
    device = compute_device(device)
    world = distributed.world(device)
    work = work_directory(out)
    if not resume or not work.exists():
        check_out(out, overwrite)  # resuming into an existing --out is fine: it is replaced only at the end
    if not world.main:  # each rank checkpoints its own share of the streams beside rank 0's work directory
        work = work.with_name(f"{work.name}.rank{world.rank}")
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
    storage = (empty.config.dtype if isinstance(empty.config.dtype, torch.dtype)
               else getattr(torch, str(empty.config.dtype)))
    activation = (torch.float16 if storage == torch.float32 else storage) if offload else torch.float32
    source = StreamedBlocks(shards, work, device, activation, storage, resume, overwrite, world)
    compressed = compress_model(empty, recipe, calib, tokenizer, progress, source=source)
    compressed.base_model = compressed.report["base_model"] = model if model == "demo" else directory
    if not world.main:  # rank 0 writes the output; the others drop their streams once it has
        distributed.barrier(world)
        shutil.rmtree(work)
        return compressed
    files = source.write_outside(compressed.model, architecture(compressed.model))
    # A resumed run may replace the --out that its first run was allowed to replace. The bookkeeping goes only once
    # the output is complete (metadata and extras written): until then the run can still be resumed.
    save_streamed(compressed, source.work, out, files, overwrite or resume,
                  None if extras is None else lambda directory: extras(directory, compressed), source.checkpoints.clean)
    distributed.barrier(world)
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
                                "misspelled): download it elsewhere and pass its local directory "
                                "with --model DIR") from None
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


def stream_error(hidden: torch.Tensor, fp_hidden: torch.Tensor, windows: int = 8,
                 world: distributed.World = distributed.World()) -> float:
    """||hidden - fp_hidden|| / ||fp_hidden|| over the calibration windows that fp_hidden holds (every rank's), a few
    windows at a time: float32 copies of whole half-precision streams (--offload) would be twice their size each."""
    num = den = 0.0
    hidden = hidden[:len(fp_hidden)]  # the first windows, where only those of the reference stream are kept
    for compressed, reference in zip(hidden.split(windows), fp_hidden.split(windows)):
        reference = reference.float()
        num += (compressed.float() - reference).square().sum().item()
        den += reference.square().sum().item()
    num, den = distributed.total([num, den], world)
    return (num / max(den, 1e-30)) ** 0.5


def solve_cost(linear: nn.Module) -> float:
    """A layer solve's relative cost, to balance owners across ranks: a factorization of its (in, in) Gram plus a
    pass over its weight against it."""
    out, inp = linear.weight.shape if hasattr(linear, "weight") else (linear.out_features, linear.in_features)
    return float(inp) ** 3 + float(out) * float(inp) ** 2


def calibration_notes(input_ids: torch.Tensor) -> list[str]:
    """Report windows that are one token repeated (padding, an empty document): they add little information."""
    constant = [i for i, window in enumerate(input_ids) if (window == window[0]).all()]
    return ([f"calibration windows {constant[:8]} are one token repeated" + (" ..." if len(constant) > 8 else "")]
            if constant else [])


def select_linears(arch: Architecture, blocks: nn.ModuleList, recipe: Recipe,
                   bases: dict[str, torch.Tensor] | None = None) -> list[list[str]]:
    """Per block, the full names of the linears to compress, in data-flow order (recipe include / exclude regexes;
    with `bases`, only the layers someone else quantized)."""
    selected = []
    for index in range(len(blocks)):
        names = [f"{arch.blocks}.{index}.{local}" for local in arch.linears]
        selected.append([name for name in names
                         if (not recipe.include or any(re.search(p, name) for p in recipe.include))
                         and not any(re.search(p, name) for p in recipe.exclude)])
    if not any(selected):
        raise CompressError("no linear layer matches the recipe's include / exclude patterns")
    if bases is not None:
        missing = sorted(set(bases) - {name for block in selected for name in block})
        if missing:
            raise CompressError("the quantized checkpoint has layers the model lacks or the recipe excludes: "
                                f"{missing[:3]}")
        selected = [[name for name in block if name in bases] for block in selected]
    return selected


def check_group_size(group_size: int, shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> None:
    """Refuse a group size that divides none of the tensors to quantize (their input widths)."""
    widths = {w for name, (_, inp) in shapes.items()
              for w in ((inp,) if ranks.get(name) is None else (ranks[name], inp))}
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
