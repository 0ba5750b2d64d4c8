"""LRQ (Lee et al., NAACL 2025, "Learning Low-Rank Weight-Scaling Matrices"): FlexRound with a low-rank S2.

Every linear of a decoder block gets a learned rounding on the shared grid of kernels.grid:

  W_hat = s1 * ( clamp( round( W / (s1 * exp(S2)) ) + z, 0, 2^b - 1 ) - z ),   S2 = L U + r 1^T + 1 c^T

weight W (out, in); s1 (out, groups) the per-group step, learned as log s1 from the grid of the config's
clip (grid.find_params; MSE-clipped by default, as the authors initialise it); z (out, groups) the integer
zero of that grid, fixed (2^(b-1) when symmetric);
L (out, rank) = 0, U (rank, in) Kaiming-uniform (bound 1/sqrt(in)), r (out, 1) = 0, c (1, in) = 0, so
training starts exactly at round-to-nearest. round() has a straight-through gradient. Dividing W by a
learned per-element factor lets each weight round up or down; de-quantization multiplies by s1 only, so
after training S2 folds away: the result is a plain QuantizedWeight (ints, fp16 scales s1, zeros z).

All linears of one block are learned together (the authors' block reconstruction, quant/REM_fast.py of
onliwad101/FlexRound_LRQ): minimise mean((block_q(X_q) - Y_fp)^2) with X_q the compressed stream's inputs
to the block and Y_fp the full-precision stream's outputs, Adam on mini-batches of calibration windows with
a cosine learning rate down to 0. The forward pass runs the block through torch.func.functional_call with
the quantized weights substituted, so the block itself is never modified and its weights get no gradient.

s1 passes through fp16 in every forward pass (straight-through), so the loss is computed with exactly the
scales that are stored and the folded weight dequantizes bit for bit to the W_hat of the last iteration.

Scaled down from the authors' settings (rank 1024, 5000 iterations, batch 2, lr 9e-4 for Llama-2 7B W4A16;
MSE-searched s1 init) for small models and a short run: rank 16, 200 iterations, batch 4, lr 1e-3, s1 init
on the grid every quantizer here shares. Unlike the released code, every matrix gets the low-rank S2
(the code falls back to a full S2 for some shapes). Float32 math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from compress import distributed
from compress.errors import CompressError
from compress.quantize import LearnedConfig
from kernels.grid import QuantizedWeight, find_params, make_quantized, resolve_group_size

FP16_MIN, FP16_MAX = 2.0**-14, 65504.0  # the range of scales the grid stores (find_params clamps to the same floor)


@dataclass(frozen=True)
class LRQ(LearnedConfig):
    """LRQ on the grid of GridConfig, learned one block at a time: `rank` of L U (clipped to min(out, in); 16,
    scaled down from the paper's 1024), Adam settings of LearnedConfig (the seed also draws U's init)."""

    rank: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 0:
            raise CompressError(f"LRQ rank must be >= 0, got {self.rank}")


def weight_scaling(L: torch.Tensor, U: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """S2 = L U + r 1^T + 1 c^T: (out, in) from L (out, rank), U (rank, in), r (out, 1), c (1, in)."""
    return L @ U + r + c


def lrq_rounded(weight: torch.Tensor, s1: torch.Tensor, zero: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
                r: torch.Tensor, c: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The grid integers clamp(round(W / (s1 exp(S2))) + z, 0, 2^b - 1) as float32 (out, in), with a
    straight-through gradient for round(); s1 and zero are (out, in // group_size)."""
    s1_full = s1.repeat_interleave(group_size, dim=1)
    zero_full = zero.float().repeat_interleave(group_size, dim=1)
    x = weight / (s1_full * torch.exp(weight_scaling(L, U, r, c)))
    x = x + (torch.round(x) - x).detach()
    return torch.clamp(x + zero_full, 0, 2**bits - 1)


def lrq_weight(weight: torch.Tensor, s1: torch.Tensor, zero: torch.Tensor, L: torch.Tensor, U: torch.Tensor,
               r: torch.Tensor, c: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """W_hat = s1 * (clamp(round(W / (s1 exp(S2))) + z, 0, 2^b - 1) - z): (out, in) float32, differentiable in
    s1, L, U, r, c (straight-through round). With fp16-representable s1 it equals, bit for bit, the dequantized
    make_quantized(lrq_rounded(...), s1, zero, ...)."""
    q = lrq_rounded(weight, s1, zero, L, U, r, c, bits, group_size)
    rows, cols = weight.shape
    grouped = (q - zero.float().repeat_interleave(group_size, dim=1)).reshape(rows, -1, group_size)
    return (grouped * s1.unsqueeze(-1)).reshape(rows, cols)  # the product grid.dequantize computes


def _through_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 (within the grid's scale range) in the forward pass, identity gradient."""
    return x + (x.clamp(FP16_MIN, FP16_MAX).half().float() - x).detach()


class LRQParams(nn.Module):
    """The learned quantizer of one weight (out, in): log_s1 (out, groups), L (out, rank), U (rank, in),
    r (out, 1), c (1, in); the zeros (out, groups) int32 are a fixed buffer."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, rank: int,
                 generator: torch.Generator, clip: str = "minmax"):
        super().__init__()
        rows, cols = weight.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        scales, zeros = find_params(weight, bits, group_size, symmetric, clip)
        rank = min(rank, rows, cols)
        bound = 1 / math.sqrt(cols)  # kaiming_uniform_(a=sqrt(5)) on U (rank, in), as the authors initialise it
        up_init = (torch.rand(rank, cols, generator=generator) * 2 - 1) * bound
        self.log_s1 = nn.Parameter(scales.log())
        self.L = nn.Parameter(torch.zeros(rows, rank, device=weight.device))
        self.U = nn.Parameter(up_init.to(weight.device))
        self.r = nn.Parameter(torch.zeros(rows, 1, device=weight.device))
        self.c = nn.Parameter(torch.zeros(1, cols, device=weight.device))
        self.register_buffer("zeros", zeros)

    def scales(self) -> torch.Tensor:
        """s1 (out, groups) as stored: fp16-rounded, straight-through."""
        return _through_fp16(torch.exp(self.log_s1))

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W_hat (out, in), what the block sees during training."""
        return lrq_weight(weight, self.scales(), self.zeros, self.L, self.U, self.r, self.c, self.bits, self.group_size)

    @torch.no_grad()
    def fold(self, weight: torch.Tensor) -> QuantizedWeight:
        """S2 folded into the integers: the packed weight, dequantizing exactly to self.weight(weight)."""
        s1 = self.scales()
        ints = lrq_rounded(weight, s1, self.zeros, self.L, self.U, self.r, self.c, self.bits, self.group_size)
        return make_quantized(ints.to(torch.int32), s1, self.zeros, self.bits, self.symmetric)


def train_lrq_block(block: nn.Module, linears: dict[str, nn.Linear], inputs: torch.Tensor, targets: torch.Tensor,
                    block_kwargs: dict, config: LRQ) -> dict[str, LRQParams]:
    """Learn the LRQ quantizers of the block's `linears` ({full name: linear}) on inputs and targets
    (N, T, hidden): Adam, cosine learning rate, mean squared block-output error. The block is not modified."""
    device = next(block.parameters()).device
    local = _local_weight_names(block, linears)
    generator = torch.Generator().manual_seed(config.seed)
    weights = {name: linear.weight.detach().float() for name, linear in linears.items()}
    quantizers = {name: LRQParams(w, config.bits, resolve_group_size(w.shape[1], config.group_size),
                                  config.symmetric, config.rank, generator, config.clip)
                  for name, w in weights.items()}
    # The block's own tensors, detached and in float32: no gradient reaches them, and nothing of theirs changes.
    frozen = {name: p.detach().float() for name, p in block.named_parameters()}
    frozen.update({name: b.float() if b.is_floating_point() else b for name, b in block.named_buffers()})
    kwargs = _float32(block_kwargs, device)

    params = [p for q in quantizers.values() for p in q.parameters()]
    if config.iterations == 0 or not params:
        return quantizers
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations, eta_min=0.0)
    world = distributed.current()  # under torchrun: each rank draws its part of the batch from its own windows
    batch_size = distributed.share_of_batch(config.batch_size, len(inputs), world)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(config.iterations):
        if len(order) < batch_size:  # a new pass over the windows, in a seeded random order
            order = torch.cat([order, torch.randperm(len(inputs), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        x = inputs[batch].to(device, torch.float32)
        y = targets[batch].to(device, torch.float32)
        quantized = {local[name]: q.weight(weights[name]) for name, q in quantizers.items()}
        out = _first(functional_call(block, {**frozen, **quantized}, (x,), kwargs))
        loss = (out - y).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(params, len(batch), world)
        optimizer.step()
        schedule.step()
    return quantizers


def quantize_block_lrq(block: nn.Module, linears: dict[str, nn.Linear], inputs: torch.Tensor, targets: torch.Tensor,
                       block_kwargs: dict, config: LRQ) -> dict[str, QuantizedWeight]:
    """LRQ on one decoder block: {full name: QuantizedWeight} for `linears` ({full name: linear of `block`}).

    inputs: (N, T, hidden) the compressed stream's inputs to the block; targets: (N, T, hidden) the
    full-precision stream's outputs of the block; block_kwargs: what the block's forward takes besides the
    hidden states. The block's weights are left as they were.
    """
    quantizers = train_lrq_block(block, linears, inputs, targets, block_kwargs, config)
    return {name: q.fold(linears[name].weight.detach().float()) for name, q in quantizers.items()}


def quantize_window_lrq(blocks: list[nn.Module], linears: list[dict[str, nn.Linear]], inputs: torch.Tensor,
                        targets: torch.Tensor, block_kwargs: dict, config: LRQ) -> list[dict[str, QuantizedWeight]]:
    """LRQ through the learned quantizers' interface: its window is one block (see quantize_block_lrq)."""
    (block,), (named,) = blocks, linears
    return [quantize_block_lrq(block, named, inputs, targets, block_kwargs, config)]


def _local_weight_names(block: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, str]:
    """{full name: the linear's weight name inside the block}, found by module identity."""
    inside = {id(module): name for name, module in block.named_modules()}
    missing = [name for name, linear in linears.items() if id(linear) not in inside]
    if missing:
        raise ValueError(f"linears not in the block: {missing}")
    return {name: f"{inside[id(linear)]}.weight" for name, linear in linears.items()}


def _float32(value, device: torch.device):
    """Floating tensors (also inside tuples, lists, dicts) cast to float32 on `device`; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v, device) for k, v in value.items()}
    return value


def _first(out):
    return out[0] if isinstance(out, tuple) else out
