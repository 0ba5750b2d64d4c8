"""What the block loop calls: the rank plan, the layer stage (factorize, quantize, compensate one linear) and the
block-level stages (LoRAP's MLP pruning, learned quantizers over windows of blocks)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from calibration import Statistics, group_statistics, run_block
from compress import distributed
from compress.allocate import lorap_attention_ranks, uniform_ranks, welore_ranks
from compress.architectures import Architecture
from compress.compensate import CompensateConfig
from compress.errors import CompressError
from compress.factorize import FactorizeConfig
from compress.layer import CompressedLinear
from compress.linalg import nonfinite_count, output_error, precision
from compress.methods import run
from compress.prune import channel_scores, channels_to_keep, prune_mlp_weights
from compress.quantize import GridConfig, LearnedConfig
from compress.quantize.cbq import windows
from compress.quantize.gptq import GPTQ
from compress.quantize.rtn import RTN
from kernels.grid import QuantizedWeight, resolve_group_size


@dataclass(frozen=True)
class Plan:
    """What the allocator decided: a rank per layer (None: stays dense) and whether LoRAP prunes the MLPs."""

    ranks: dict[str, int | None]
    prune: bool = False


def allocate(config: FactorizeConfig, arch: Architecture, targets: list[list[str]], shapes: dict[str, tuple[int, int]],
             weight_of: Callable[[str], torch.Tensor]) -> Plan:
    """Per-layer ranks for the stage's budget and allocator. targets: per block, the full names of its targeted
    linears; shapes: {name: (out, in)}; weight_of(name): a layer's weight (read only by welore)."""
    if config.allocate == "uniform":
        return Plan(uniform_ranks(shapes, config.rank_budget))
    if config.allocate == "welore":
        spectra = {name: torch.linalg.svdvals(weight_of(name).double()) for block in targets for name in block}
        try:
            return Plan(welore_ranks(spectra, shapes, config.rank_budget))
        except ValueError as exc:
            raise CompressError(str(exc)) from None
    if not arch.attention or not arch.mlp:
        raise CompressError("lorap needs separate attention and MLP projections; this family fuses them "
                            "(compress/architectures.py)")
    ranks = {}
    for index, block in enumerate(targets):
        prefix = f"{arch.blocks}.{index}."
        if {prefix + local for local in arch.attention + arch.mlp} - set(block):
            raise CompressError("lorap needs every attention and MLP projection of a block "
                                f"({', '.join(arch.attention + arch.mlp)})")
        leaves = {local.rsplit(".", 1)[-1]: prefix + local for local in arch.attention}
        attention = lorap_attention_ranks({leaf: shapes[name] for leaf, name in leaves.items()}, config.rank_budget)
        ranks.update({leaves[leaf]: rank for leaf, rank in attention.items()})
        ranks.update({prefix + local: None for local in arch.mlp})
    return Plan(ranks, prune=True)


@dataclass
class LayerRecord:
    """One layer's outcome for the report: its shape, rank (None: no factors), bits and group size per quantized
    part, what the methods chose (damping, beta), the relative output error ||(W - W')X|| / ||WX||, the MLP channels
    LoRAP kept, and notes."""

    shape: list[int]
    relative_error: float = 0.0
    rank: int | None = None
    bits: int | None = None
    group_size: dict[str, int] | None = None
    details: dict = field(default_factory=dict)
    channels_kept: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        entry = {key: value for key, value in asdict(self).items() if key not in ("details", "notes")}
        return {key: value for key, value in {**entry, **self.details}.items() if value is not None}


def compress_linear(name: str, linear: nn.Module, statistics: Statistics, rank: int | None, factorize, quantize,
                    compensate, given: torch.Tensor | QuantizedWeight | None = None,
                    kernel: str = "reference") -> tuple[CompressedLinear, LayerRecord]:
    """Factorize (rank given) and/or quantize one linear's weight (out, in), or take a given base (someone else's
    dequantized weight, or one a learned quantizer made), then compensate; returns the layer (computing with
    `kernel`) and its record."""
    # a streamed block's weight in its 16-bit storage: GPTQ's float32 copy is the only one (405B's MLP: 3.25 GiB each)
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach().clone()
    gram = statistics.gram
    record = LayerRecord(shape=list(weight.shape))
    bad = nonfinite_count(weight)
    if bad:
        raise CompressError(f"{name}: the weight holds {bad} NaN/Inf values; a broken checkpoint cannot be compressed")
    dead = (gram.diagonal() == 0).sum().item()
    if dead:
        record.notes.append(f"{name}: {dead} of {len(gram)} input channels were never active in calibration (damped)")
    base = up = down = None
    if factorize is not None and rank is not None:
        factorization = run(factorize)(weight.float(), statistics, rank, factorize)
        up, down = factorization.lowrank.up, factorization.lowrank.down
        record.rank, record.details = rank, factorization.details()
    else:
        base = weight if given is None else given
    if quantize is not None:
        parts = {}
        if isinstance(given, QuantizedWeight):
            parts["base"] = given
        elif base is not None:
            parts["base"] = quantize_tensor(base, gram, quantize, f"{name}.base", record.notes, statistics.cross)
        else:  # the factor `up` sees the input `down @ x`, whose Gram is down G down^T (down as quantized)
            parts["down"] = quantize_tensor(down, gram, quantize, f"{name}.down", record.notes)
            parts["up"] = quantize_tensor(up, factor_gram(parts["down"], gram, quantize), quantize, f"{name}.up",
                                          record.notes)
        base, up, down = (parts.get(part) for part in ("base", "up", "down"))
        record.bits = quantize.bits
        record.group_size = {part: q.group_size for part, q in parts.items()}
    if compensate is not None:
        up, down = compensation(weight, base, statistics, compensate, quantize, name, record.notes, record.details)
        record.rank = down.shape[0]
    # Dense parts are stored in fp16: cast now so that the model in memory is the one written. A given base
    # stays exact: it stands for someone else's quantized tensors, which are kept as they are.
    up, down = (t.half().contiguous() if isinstance(t, torch.Tensor) else t for t in (up, down))
    if given is None and isinstance(base, torch.Tensor):
        base = base.half()
    layer = CompressedLinear.from_parts(base, up, down, bias, kernel=kernel)
    approx = layer.weight_approx()
    if nonfinite_count(approx):
        raise CompressError(f"{name}: the compressed weight is not finite (weights beyond the fp16 range of the "
                            "scales, or degenerate calibration statistics); nothing was written")
    record.relative_error = output_error(weight, approx, gram)
    return layer, record


def quantize_tensor(tensor: torch.Tensor, gram: torch.Tensor | None, config: GridConfig, name: str,
                    notes: list[str], cross: torch.Tensor | None = None) -> QuantizedWeight:
    """A layer quantizer on one tensor (out, in) whose inputs have Gram `gram` (in, in; RTN reads none) and, where
    both streams were captured, cross statistics sum (x_fp - x) x^T; a learned quantizer's grid here is RTN's (it
    learns whole blocks, not tensors)."""
    group_size = resolve_group_size(tensor.shape[1], config.group_size)
    if config.group_size and group_size != config.group_size:
        notes.append(f"{name}: group size {config.group_size} does not divide {tensor.shape[1]}, used {group_size}")
    if isinstance(config, LearnedConfig):
        config = RTN(config.bits, config.group_size, config.symmetric, config.clip)
    config = replace(config, group_size=group_size)
    try:
        # GPTQ makes its own float32 copy: a 16-bit weight is not copied twice (3.25 GiB a copy for 405B's MLP)
        quantization = run(config)(tensor if isinstance(config, GPTQ) else tensor.float(), gram, config, cross=cross)
    except ValueError as exc:
        raise CompressError(f"{name}: {exc}") from None
    if quantization.damp_raised:
        notes.append(f"{name}: GPTQ damping raised from {config.damp:g} to {quantization.damp:g} of the mean diagonal "
                     "(Cholesky failed)")
    return quantization.weight


def compensation(weight: torch.Tensor, base: torch.Tensor | QuantizedWeight, statistics: Statistics,
                 config: CompensateConfig, quantize: GridConfig | None, name: str = "layer",
                 notes: list[str] | None = None, details: dict | None = None) -> tuple[torch.Tensor | QuantizedWeight,
                                                                                      torch.Tensor | QuantizedWeight]:
    """Low-rank factors (up, down) of the error weight - base; quantized per output channel when asked (with GPTQ
    when the base was, else RTN), `up` refit by least squares to the quantized `down` first. `details` gets the
    eigen-directions the method could use, where it counts them."""
    error = weight.float() - (base.dequantize() if isinstance(base, QuantizedWeight) else base.float())
    lowrank = run(config)(error, statistics, config)
    if details is not None and lowrank.directions is not None:
        details["compensation_directions"] = lowrank.directions
    if config.factor_bits is None:
        return lowrank.up, lowrank.down
    gptq = isinstance(quantize, GPTQ)
    grid = dict(bits=config.factor_bits, group_size=0, symmetric=False)
    per_channel = GPTQ(**grid, damp=quantize.damp) if gptq else RTN(**grid)
    notes = [] if notes is None else notes
    down = quantize_tensor(lowrank.down, statistics.gram, per_channel, f"{name}.compensation.down", notes)
    up = refit_up(error, down, statistics.gram)
    up = quantize_tensor(up, factor_gram(down, statistics.gram, per_channel), per_channel, f"{name}.compensation.up",
                         notes)
    return up, down


def refit_up(target: torch.Tensor, down: QuantizedWeight, gram: torch.Tensor) -> torch.Tensor:
    """The `up` (out, rank) minimising ||(target - up down) X||_F for a fixed (quantized) `down`: the normal equations
    up (down G down^T) = target G down^T, with a ridge of 1e-10 of the mean diagonal against rank-deficient inputs."""
    down = down.dequantize(precision(gram))
    projected = down @ gram.to(down.dtype)  # (rank, in), in the Gram's precision: no float64 copy of a float32 Gram
    normal = (projected @ down.T).double()
    normal.diagonal().add_(1e-10 * normal.diagonal().mean().clamp(min=1e-30))
    rhs = (target.to(projected.dtype) @ projected.T).double()  # (out, rank)
    return torch.linalg.solve(normal, rhs.T).T.float()


def factor_gram(down: QuantizedWeight, gram: torch.Tensor, config: GridConfig) -> torch.Tensor | None:
    """The Gram of `up`'s input `down @ x`: down G down^T (down as quantized); None for RTN, which reads no Gram."""
    if not isinstance(config, GPTQ):
        return None
    down = down.dequantize(precision(gram))
    return down @ gram.to(down.dtype) @ down.T


def prune_mlp(block: nn.Module, arch: Architecture, hidden: torch.Tensor, block_kwargs: dict, fraction: float,
              world: distributed.World = distributed.World()) -> tuple[int, dict[str, nn.Module]]:
    """LoRAP's structured pruning of one block's MLP, in place (its three linears replaced by narrower ones), from
    the channel norms of the block's calibration inputs (every rank's windows); returns the intermediate channels
    kept and the original linears {name inside the block: module}.

    The kept count is rounded down to a multiple of 32, so that quantization groups still divide down_proj's
    input (a prime width would leave groups of one column)."""
    gate, up, down = arch.mlp
    statistics, _ = group_statistics(block, [(gate,), (down,)], hidden, block_kwargs)
    distributed.sum_([statistics[gate].gram, statistics[down].gram], world)
    input_norm, inter_norm = (statistics[n].gram.diagonal().clamp(min=0).sqrt().float() for n in (gate, down))
    weights = [block.get_submodule(n).weight.detach().float() for n in arch.mlp]
    scores = channel_scores(*weights, input_norm, inter_norm)
    channels = len(scores)
    kept = max(32, int(channels * (1 - fraction)) // 32 * 32) if channels >= 64 else channels - int(channels * fraction)
    keep = channels_to_keep(scores, (channels - kept) / channels)
    originals = {local: block.get_submodule(local) for local in arch.mlp}
    for local, weight in zip(arch.mlp, prune_mlp_weights(*weights, keep)):
        dtype = originals[local].weight.dtype
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=dtype)
        linear.weight.data.copy_(weight)
        block.set_submodule(local, linear)
    return len(keep), originals


class LearnedQuantizer:
    """A learned quantizer (LRQ, CBQ, SignRound) as a block-level stage: at the start of each window it learns the
    quantized weights of every targeted linear in the window from both streams; the layer stage then takes them as
    given. Weights learned for blocks past the current one wait in `pending` ({block: {name: QuantizedWeight}})."""

    def __init__(self, config: LearnedConfig, blocks: int, pending: dict[int, dict[str, QuantizedWeight]]):
        self.config, self.pending = config, pending
        self.window_at = {window.start: window for window in windows(blocks, config.window, config.overlap)}

    def window(self, index: int) -> range:
        """The blocks that must be in memory when the loop reaches block `index`."""
        return self.window_at.get(index, range(index, index + 1))

    def learn(self, blocks: nn.ModuleList, targets: list[list[str]], index: int, hidden: torch.Tensor,
              fp_out: torch.Tensor, block_kwargs: dict, prefix: str) -> dict[str, QuantizedWeight]:
        """The block's learned weights (learning its window first if one starts here). `hidden` is the window's
        compressed-stream input, `fp_out` the full-precision output of its first block (the later ones are still
        uncompressed and run here)."""
        if index in self.window_at:
            window = self.window_at[index]
            fp_target = fp_out
            for later in window[1:]:
                fp_target = run_block(blocks[later], fp_target, block_kwargs)
            linears = [{name: blocks[later].get_submodule(name[len(f"{prefix}.{later}."):]) for name in targets[later]}
                       for later in window]
            learned = run(self.config)([blocks[i] for i in window], linears, hidden, fp_target, block_kwargs,
                                       self.config)
            self.pending.update(zip(window, learned))
        return self.pending.pop(index, {})
