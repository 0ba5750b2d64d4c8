"""SignRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs"; the method of Intel's AutoRound): rounding offsets and clip ranges learned by signed gradient descent.

Every linear of a decoder block gets, on the shared grid of kernels.grid,

  W_hat = s * ( clamp( round(W / s + V) + z, 0, 2^b - 1 ) - z ),
  s = (alpha * max - beta * min) / (2^b - 1),   z = round(-beta * min / s)          (asymmetric)
  s = 2 * alpha * max(|min|, max) / (2^b - 1),  z = 2^(b-1)                           (symmetric)

weight W (out, in); min <= 0 <= max the min-max range of each (row, group) (as grid.find_params takes it);
V (out, in) a rounding offset in [-0.5, 0.5], init 0; alpha, beta (out, groups) clip factors in [0.5, 1],
init 1 (beta only when asymmetric), or with the config's MSE clip the shrink grid.mse_shrink chose (at least 0.5).
round() has a straight-through gradient, also in z, and s passes through fp16 (straight-through), so the loss sees
exactly the scales that are stored: at the start the grid is find_params's and W_hat is round-to-nearest's, bit for
bit (where the MSE shrink is below 0.5 the start is clipped less).

All linears of one block are learned together: minimise mean((block_q(X_q) - Y_fp)^2) with X_q the
compressed stream's inputs to the block and Y_fp the full-precision stream's outputs, by signed gradient
descent, p -= lr_t * sign(grad), lr_t falling linearly from lr (default 1 / iterations) to 0 (AutoRound's
LinearLR), on mini-batches of calibration windows drawn in a seeded random order; V is clamped to [-0.5, 0.5]
and alpha, beta to [0.5, 1] after each step. As in AutoRound the parameters of the step with the lowest
mini-batch loss are kept (the loss of a step is that of the parameters before its update, so the start is a
candidate). The forward pass runs the block through torch.func.functional_call with the quantized weights
substituted, so the block itself is never modified and its weights get no gradient.

Started from GPTQ (start "gptq", not in the paper): V = 0 rounds GPTQ's error-updated weight instead of W, so the
start is GPTQ's result (where the grid is GPTQ's, see gptq_bases) and each weight may still move one grid step either
way from GPTQ's choice.

Not in AutoRound: the mini-batch losses of different steps are on different windows, so the kept state is then
compared with the start on all the windows (one forward pass each) and the start is kept when it is not worse;
the block's loss on the calibration windows is therefore never above round-to-nearest's on the min-max grid.
AutoRound's defaults otherwise: 200 iterations, lr 1 / iterations (5e-3), batch 8, minmax clip factors on.
Float32 math.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from compress import distributed
from compress.errors import CompressError
from compress.quantize import GridConfig, LearnedConfig
from compress.quantize.gptq import run_gptq
from compress.quantize.lrq import _first, _float32, _local_weight_names
from kernels.grid import QuantizedWeight, make_quantized, mse_shrink, resolve_group_size

FP16_MIN, FP16_MAX = 2.0**-14, 65504.0  # the range of scales the grid stores (find_params clamps to the same floor)
V_RANGE, CLIP_RANGE = (-0.5, 0.5), (0.5, 1.0)
STARTS = ("rtn", "gptq")


@dataclass(frozen=True)
class SignRound(LearnedConfig):
    """SignRound on the grid of GridConfig, learned one block at a time, with AutoRound's defaults: `iterations`
    signed-gradient steps at learning rate `lr` (None: 1 / iterations) falling linearly to 0, on batches of
    `batch_size` calibration windows drawn with `seed`. start: what V = 0 rounds, the weight ("rtn") or GPTQ's
    error-updated weight ("gptq": the start is then GPTQ's result, see gptq_bases)."""

    iterations: int = 200
    lr: float | None = None
    batch_size: int = 8
    seed: int = 0
    start: str = "rtn"

    def __post_init__(self):
        GridConfig.__post_init__(self)  # LearnedConfig's check needs a number for lr
        if self.iterations < 0 or self.batch_size < 1 or not (self.lr is None or self.lr > 0):
            raise CompressError(f"SignRound needs iterations >= 0, lr > 0 (or None: 1 / iterations) and "
                                f"batch_size >= 1, got {self.iterations}, {self.lr}, {self.batch_size}")
        if self.start not in STARTS:
            raise CompressError(f"SignRound start must be one of {', '.join(STARTS)}, got {self.start!r}")

    @property
    def step_size(self) -> float:
        """The first step's learning rate: lr, or 1 / iterations."""
        return self.lr if self.lr is not None else 1.0 / max(self.iterations, 1)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _through_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 (within the grid's scale range) in the forward pass, identity gradient."""
    return x + (x.clamp(FP16_MIN, FP16_MAX).half().float() - x).detach()


class SignRoundParams(nn.Module):
    """The learned quantizer of one weight (out, in): V (out, in), alpha (out, groups), and beta (out, groups)
    when asymmetric; the group minima and maxima of the weight (out, groups) are fixed buffers."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str = "minmax",
                 base: torch.Tensor | None = None):
        super().__init__()
        rows, cols = weight.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        # what is rounded: the weight, or GPTQ's error-updated weight (its start is then GPTQ's result)
        self.register_buffer("base", (weight if base is None else base).float().clone())
        grouped = weight.float().reshape(rows, cols // group_size, group_size)
        wmin, wmax = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
        if symmetric:
            wmax = torch.maximum(wmin.abs(), wmax)
        self.register_buffer("wmin", wmin)
        self.register_buffer("wmax", wmax)
        self.v = nn.Parameter(torch.zeros(rows, cols, device=weight.device))
        # the start: min-max (alpha = beta = 1), or the MSE clip's shrink where it lies in the learned range
        start = mse_shrink(weight.float(), bits, group_size, symmetric, clip).clamp(min=CLIP_RANGE[0])
        self.alpha = nn.Parameter(start.clone())
        self.beta = None if symmetric else nn.Parameter(start.clone())

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros), each (out, groups) float32: the scales fp16-rounded and the zeros rounded, both
        straight-through; with alpha = beta = 1 exactly grid.find_params's."""
        maxq = 2**self.bits - 1
        high = self.alpha * self.wmax
        low = -high if self.symmetric else self.beta * self.wmin
        span = high - low
        span = torch.where(span == 0, torch.ones_like(span), span)  # an all-zero group: any scale is exact
        scales = _through_fp16(span / maxq)
        if self.symmetric:
            return scales, torch.full_like(scales, 2 ** (self.bits - 1))
        return scales, _round_ste(-low / scales).clamp(0, maxq)

    def rounded(self, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """The grid integers clamp(round(B / s + V) + z, 0, 2^b - 1) of the base B, (out, groups, group_size)
        float32, straight-through."""
        rows, cols = self.base.shape
        grouped = self.base.reshape(rows, -1, self.group_size) / scales.unsqueeze(-1)
        x = _round_ste(grouped + self.v.reshape(rows, -1, self.group_size))
        return torch.clamp(x + zeros.unsqueeze(-1), 0, 2**self.bits - 1)

    def weight(self) -> torch.Tensor:
        """W_hat (out, in) float32, differentiable in V, alpha, beta; equal, bit for bit, to fold() dequantized."""
        scales, zeros = self.grid()
        q = self.rounded(scales, zeros)
        return ((q - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(self.base.shape)  # as grid.dequantize

    @torch.no_grad()
    def fold(self) -> QuantizedWeight:
        """The packed weight: ints, fp16 scales, zeros."""
        scales, zeros = self.grid()
        ints = self.rounded(scales, zeros).reshape(self.base.shape).to(torch.int32)
        return make_quantized(ints, scales, zeros.to(torch.int32), self.bits, self.symmetric)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(*V_RANGE)
        for p in (self.alpha, self.beta):
            if p is not None:
                p.clamp_(*CLIP_RANGE)


@dataclass
class SignRoundTrace:
    """What a block's training did: the mini-batch loss of every step (of the parameters before its update),
    the step whose parameters were kept (-1: the start, when it is not worse on all windows; also when no step
    ran), and the block loss on all windows at the start and of the kept parameters."""

    losses: list[float] = field(default_factory=list)
    best_step: int = -1
    start_loss: float = float("nan")
    final_loss: float = float("nan")


def train_signround_block(block: nn.Module, linears: dict[str, nn.Linear], inputs: torch.Tensor,
                          targets: torch.Tensor, block_kwargs: dict, config: SignRound,
                          on_step: Callable[[int, float, dict[str, torch.Tensor]], None] | None = None
                          ) -> tuple[dict[str, SignRoundParams], SignRoundTrace]:
    """Learn the SignRound quantizers of the block's `linears` ({full name: linear}) on inputs and targets
    (N, T, hidden); they come back holding the kept parameters. on_step(step, loss, {name: W_hat}) sees every
    step's loss and the weights it was computed with. The block is not modified."""
    device = next(block.parameters()).device
    local = _local_weight_names(block, linears)
    generator = torch.Generator().manual_seed(config.seed)
    world = distributed.current()  # under torchrun: each rank draws its part of the batch from its own windows
    weights = {name: linear.weight.detach().float() for name, linear in linears.items()}
    group_sizes = {name: resolve_group_size(w.shape[1], config.group_size) for name, w in weights.items()}
    bases = gptq_bases(block, linears, weights, group_sizes, inputs, block_kwargs, config) \
        if config.start == "gptq" else {}
    quantizers = {name: SignRoundParams(w, config.bits, group_sizes[name], config.symmetric, config.clip,
                                        bases.get(name)) for name, w in weights.items()}
    # The block's own tensors, detached and in float32: no gradient reaches them, and nothing of theirs changes.
    frozen = {name: p.detach().float() for name, p in block.named_parameters()}
    frozen.update({name: b.float() if b.is_floating_point() else b for name, b in block.named_buffers()})
    kwargs = _float32(block_kwargs, device)
    trace = SignRoundTrace()
    params = [p for q in quantizers.values() for p in q.parameters()]
    if config.iterations == 0 or not params:
        return quantizers, trace

    def quantized() -> dict[str, torch.Tensor]:
        return {local[name]: q.weight() for name, q in quantizers.items()}

    def loss_on(batch: torch.Tensor, substituted: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[batch].to(device, torch.float32)
        y = targets[batch].to(device, torch.float32)
        out = _first(functional_call(block, {**frozen, **substituted}, (x,), kwargs))
        return (out - y).pow(2).mean()

    @torch.no_grad()
    def full_loss() -> float:
        """The mean squared block-output error on all windows (every rank's), in batches."""
        substituted = quantized()
        total = 0.0
        for batch in torch.arange(len(inputs)).split(config.batch_size):
            total += loss_on(batch, substituted).item() * len(batch)
        return distributed.mean(total / len(inputs), len(inputs), world)

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore(state: list[torch.Tensor]) -> None:
        for p, saved in zip(params, state):
            p.copy_(saved)

    start, best, best_loss = snapshot(), None, float("inf")
    batch_size = distributed.share_of_batch(config.batch_size, len(inputs), world)
    order = torch.empty(0, dtype=torch.long)
    for step in range(config.iterations):
        if len(order) < batch_size:  # a new pass over the windows, in a seeded random order
            order = torch.cat([order, torch.randperm(len(inputs), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        substituted = quantized()
        loss = loss_on(batch, substituted)
        trace.losses.append(distributed.mean(loss.item(), len(batch), world))  # every rank keeps the same best step
        if on_step is not None:
            on_step(step, trace.losses[-1], {name: substituted[local[name]].detach() for name in quantizers})
        if trace.losses[-1] < best_loss:
            best, best_loss, trace.best_step = snapshot(), trace.losses[-1], step
        for p in params:
            p.grad = None
        loss.backward()
        distributed.average_gradients(params, len(batch), world)
        lr = config.step_size * (1 - step / config.iterations)  # linear decay to 0
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.sub_(lr * p.grad.sign())
        for q in quantizers.values():
            q.clamp_()

    restore(start)
    trace.start_loss = full_loss()
    trace.final_loss = trace.start_loss
    if trace.best_step > 0:  # step 0's parameters are the start's
        restore(best)
        trace.final_loss = full_loss()
        if trace.final_loss >= trace.start_loss:
            restore(start)
            trace.best_step, trace.final_loss = -1, trace.start_loss
    else:
        trace.best_step = -1
    return quantizers, trace


def gptq_bases(block: nn.Module, linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor],
               group_sizes: dict[str, int], inputs: torch.Tensor, block_kwargs: dict,
               config: SignRound) -> dict[str, torch.Tensor]:
    """{name: GPTQ's error-updated weight} of each linear: GPTQ (act-order, static groups, 1% damping) against the
    input Gram of the block run on `inputs`, each column as the loop rounded it. Rounded on the grid of the
    weight's own range (what SignRoundParams starts from), it gives GPTQ's integers wherever that grid is GPTQ's,
    that is wherever the MSE shrink is at least CLIP_RANGE[0]."""
    from calibration import record_grams, run_block

    with record_grams(linears) as grams:
        run_block(block, inputs, block_kwargs)
    distributed.sum_([accumulator.gram for accumulator in grams.values()], distributed.current())
    return {name: run_gptq(weights[name], grams[name].gram, config.bits, group_sizes[name], config.symmetric,
                           act_order=True, static_groups=True, clip=config.clip, keep_updated=True).updated
            for name in linears}


def quantize_block_signround(block: nn.Module, linears: dict[str, nn.Linear], inputs: torch.Tensor,
                             targets: torch.Tensor, block_kwargs: dict,
                             config: SignRound) -> dict[str, QuantizedWeight]:
    """SignRound on one decoder block: {full name: QuantizedWeight} for `linears` ({full name: linear of `block`}).

    inputs: (N, T, hidden) the compressed stream's inputs to the block; targets: (N, T, hidden) the
    full-precision stream's outputs of the block; block_kwargs: what the block's forward takes besides the
    hidden states. The block's weights are left as they were.
    """
    quantizers, _ = train_signround_block(block, linears, inputs, targets, block_kwargs, config)
    return {name: q.fold() for name, q in quantizers.items()}


def quantize_window_signround(blocks: list[nn.Module], linears: list[dict[str, nn.Linear]], inputs: torch.Tensor,
                              targets: torch.Tensor, block_kwargs: dict,
                              config: SignRound) -> list[dict[str, QuantizedWeight]]:
    """SignRound through the learned quantizers' interface: its window is one block (see quantize_block_signround)."""
    (block,), (named,) = blocks, linears
    return [quantize_block_signround(block, named, inputs, targets, block_kwargs, config)]
