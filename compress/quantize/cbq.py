"""CBQ (Ding et al., "CBQ: Cross-Block Quantization for Large Language Models", ICLR 2025), weight-only.

Three parts, as the paper's abstract names them:

1. CFP, coarse-to-fine pre-processing of outliers. Coarse: the candidates are the magnitudes above
   Q3 + lambda1 * IQR of their distribution. Fine: the sorted candidates are cut into a lower and an upper
   set where (mean(upper) - mean(lower))^2 - lambda2 * (var(lower) + var(upper)) is largest; the upper set
   are the outliers. Weight outliers are truncated to the largest non-outlier magnitude before the grid is
   found; activation outlier channels get a scale s = max / threshold, folded into the previous RMSNorm.
2. LoRA-Rounding (AdaRound's learnable rounding with a low-rank V): per linear, on each (row, group) grid
   with step s and integer zero z,
       h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   V = residual + up @ down,
       W_hat = s * (clamp(floor(W / s) + h(V) + z, 0, 2**bits - 1) - z),
   regularised by sum(1 - |2h - 1|^beta), and hardened to h in {0, 1} (h >= 0.5) at the end.
   `up` (out, rank) and `down` (rank, in) are the paper's A1 and A2, the only learnable rounding
   parameters: r (out + in) numbers per linear instead of AdaRound's out * in.
3. Cross-block reconstruction: the blocks of a window run in sequence on the compressed stream with the
   learnable rounding and learnable step sizes (s = exp(log_s)); the loss on the window's last output is
   MSE to the full-precision outputs + KL(softmax(fp) || softmax(q)) over the hidden dimension + the
   rounding regulariser; Adam.

What is not from the paper (its body, tables and code were not available; see METHODS.md, CBQ cards):
- zeta = 1.1, gamma = -0.1, regulariser weight 0.01, beta annealed linearly from 20 to 2 after a 20%
  warm-up without regulariser, Adam lr 1e-3: AdaRound / BRECQ public defaults.
- rank r = 5, iterations 200, batch 4: chosen for small calibration sets.
- lambda2 = 1.0 and the fine step's exact objective (squared distance of the set means, so that it has the
  unit of the variances and the cut does not depend on the weight's scale); lambda1 = 1.5 is from one
  summary of the paper (LOW confidence).
- The KL term is taken over the hidden dimension of the window's output (the paper's KL is on outputs;
  which dimension it normalises is not known): an approximation.
- The full-rank remainder of the AdaRound initialisation: V's init target logit((frac(W/s) - gamma) /
  (zeta - gamma)) is split into its best rank-r approximation (up @ down, learnable) and the remainder
  (`residual`, a frozen buffer), so that h(V) = frac(W/s) exactly at the start, as AdaRound's. A rank-r
  V alone cannot express round-to-nearest: its hardened rounding is the sign pattern of a rank-r matrix,
  close to random rounding, whose mean squared error is about 4x RTN's.
- Step sizes are learnt per (row, group), zeros stay at their min-max integers.
- Window of 2 blocks with overlap 1 is the METHODS card's LOW-MED guess of the paper's default.

Activation scaling (cfp_activation_scales, fold_scales_into_norm) is for activation quantization; the
weight-only path here does not apply it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kernels.grid import SUPPORTED_BITS, QuantizedWeight, dequantize, find_params, make_quantized, resolve_group_size

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the rectified sigmoid (not from the paper)
IQR_FACTOR = 1.5  # CFP's lambda1 (one summary of the paper, LOW confidence)
VARIANCE_WEIGHT = 1.0  # CFP's lambda2 (not from the paper)
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2  # AdaRound's annealing of the regulariser (not from the paper)


@dataclass(frozen=True)
class CBQConfig:
    """CBQ weight-only settings.

    From the paper: the structure (windows of blocks, LoRA-Rounding, CFP, MSE + KL loss). window = 2,
    overlap = 1 is the METHODS card's LOW-MED reading of the paper's default. Not from the paper: rank,
    iterations, lr, batch_size, reg_weight (AdaRound's 0.01), kl_weight (1.0, the loss as the card writes it).
    batch_size counts calibration windows (samples) per Adam step.
    """

    bits: int
    group_size: int
    symmetric: bool = False
    rank: int = 5
    iterations: int = 200
    lr: float = 1e-3
    batch_size: int = 4
    window: int = 2
    overlap: int = 1
    reg_weight: float = 0.01
    kl_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.rank < 1 or self.iterations < 0 or self.batch_size < 1 or self.window < 1:
            raise ValueError("rank, batch_size and window must be >= 1 and iterations >= 0")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window), got overlap {self.overlap} for window {self.window}")


def windows(num_blocks: int, window: int, overlap: int) -> list[range]:
    """The sliding windows of block indices: starts 0, window - overlap, ...; the last ends at num_blocks.

    A block in an overlap is learnt again by the next window, whose result is the one to keep.
    """
    step = window - overlap
    starts = list(range(0, max(num_blocks - window, 0) + 1, step))
    if starts[-1] + window < num_blocks:
        starts.append(num_blocks - window)
    return [range(start, min(start + window, num_blocks)) for start in starts]


# --- CFP: coarse-to-fine outlier detection ------------------------------------------------------------------

def outlier_threshold(magnitudes: torch.Tensor) -> float:
    """The largest non-outlier value of a set of magnitudes (any shape, >= 0); their max when none is an outlier.

    Coarse: candidates above Q3 + lambda1 * IQR. Fine: the cut of the sorted candidates into a lower and an
    upper (outlier) set maximising (mean_up - mean_low)^2 - lambda2 * (var_low + var_up); a single candidate
    is an outlier by itself.
    """
    values = magnitudes.detach().flatten().double().sort().values
    n = len(values)
    q1, q3 = (_quantile(values, q) for q in (0.25, 0.75))
    candidates = values[values > q3 + IQR_FACTOR * (q3 - q1)]
    m = len(candidates)
    if m == 0:
        return values[-1].item()
    if m == 1:
        return values[n - 2].item() if n > 1 else values[-1].item()
    # Lower set = candidates[:k], upper set = candidates[k:], k = 1 .. m-1, from prefix sums.
    s1 = torch.cumsum(candidates, 0)
    s2 = torch.cumsum(candidates**2, 0)
    k = torch.arange(1, m, dtype=values.dtype, device=values.device)
    low_mean = s1[:-1] / k
    up_mean = (s1[-1] - s1[:-1]) / (m - k)
    low_var = (s2[:-1] / k - low_mean**2).clamp(min=0)
    up_var = ((s2[-1] - s2[:-1]) / (m - k) - up_mean**2).clamp(min=0)
    score = (up_mean - low_mean) ** 2 - VARIANCE_WEIGHT * (low_var + up_var)
    cut = int(score.argmax()) + 1  # the number of candidates kept as non-outliers
    return candidates[cut - 1].item()


def _quantile(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation on sorted values (torch.quantile refuses inputs above 2**24)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low])


def cfp_weight_threshold(weight: torch.Tensor) -> float:
    """CFP on a weight (out, in): the magnitude its outliers are truncated to (the largest non-outlier |w|)."""
    return outlier_threshold(weight.abs())


def cfp_clip(weight: torch.Tensor) -> torch.Tensor:
    """The weight (out, in) with its CFP outliers truncated, float32."""
    threshold = cfp_weight_threshold(weight)
    return weight.float().clamp(-threshold, threshold)


def cfp_activation_scales(channel_absmax: torch.Tensor) -> torch.Tensor:
    """Per-channel scales (in,) for activation outliers: max / threshold on the outlier channels, 1 elsewhere.

    channel_absmax: (in,) max |x_j| over the calibration tokens. Dividing x by s and multiplying the
    weight's columns by s leaves W x unchanged (see fold_scales_into_norm).
    """
    threshold = outlier_threshold(channel_absmax)
    absmax = channel_absmax.float()
    if threshold <= 0:
        return torch.ones_like(absmax)
    return torch.where(absmax > threshold, absmax / threshold, torch.ones_like(absmax))


@torch.no_grad()
def fold_scales_into_norm(norm_weight: torch.Tensor, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """In place: norm_weight /= scales and each linear's columns *= scales.

    Exact for the linears that read the norm's output and nothing else: an RMSNorm computes
    norm_weight * x / rms(x), so dividing its weight by s divides its output by s channel-wise, and
    W diag(s) (y / s) = W y. In a Llama block q/k/v share input_layernorm and gate/up share
    post_attention_layernorm, so each group must be folded together, with one set of scales.
    """
    norm_weight.div_(scales.to(norm_weight))
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight))


# --- LoRA-Rounding: pure functions --------------------------------------------------------------------------

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's offset h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), same shape as v."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def rounding_regulariser(offset: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): zero when every offset is 0 or 1."""
    return (1 - (2 * offset - 1).abs().pow(beta)).sum()


def beta_at(step: int, iterations: int) -> float | None:
    """The regulariser's beta at a step: None during the warm-up, then linear from BETA_START to BETA_END."""
    warmup = WARMUP * iterations
    if step < warmup:
        return None
    progress = (step - warmup) / max(iterations - warmup, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - progress)


def quantized_weight(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, offset: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """W_hat = s * (clamp(floor(W / s) + h + z, 0, 2**bits - 1) - z), (rows, cols) float32.

    weight, offset: (rows, cols); scales, zeros: (rows, groups). Differentiable in scales and offset (the
    floor is a constant of the step); with offset in {0, 1} it is the hardened weight.
    """
    rows, cols = weight.shape
    groups = scales.shape[1]
    s = scales.float().unsqueeze(-1)
    z = zeros.float().unsqueeze(-1)
    grouped = weight.float().reshape(rows, groups, -1)
    q = torch.floor(grouped / s) + offset.reshape(rows, groups, -1) + z
    return (s * (q.clamp(0, 2**bits - 1) - z)).reshape(rows, cols)


def hard_ints(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, v: torch.Tensor,
              bits: int) -> torch.Tensor:
    """The hardened integers clamp(floor(W / s) + [h(V) >= 0.5] + z, 0, 2**bits - 1), (rows, cols) int32."""
    rows, cols = weight.shape
    groups = scales.shape[1]
    up = (rectified_sigmoid(v) >= 0.5).float().reshape(rows, groups, -1)
    q = torch.floor(weight.float().reshape(rows, groups, -1) / scales.float().unsqueeze(-1)) + up + zeros.unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).reshape(rows, cols).to(torch.int32)


def hardened_weight(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, v: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """The weight the hardened rounding stands for: grid.dequantize of hard_ints, (rows, cols) float32."""
    return dequantize(hard_ints(weight, scales, zeros, v, bits), scales, zeros, weight.shape[1] // scales.shape[1])


class LoRARounding(nn.Module):
    """One linear's learnable grid: step sizes exp(log_scales) and rounding V = residual + up @ down.

    weight: (out, in) the CFP-clipped weight (buffer); zeros: (out, groups) int32 (buffer);
    log_scales: (out, groups); up: (out, rank) and down: (rank, in), the paper's A1 and A2;
    residual: (out, in) the part of V's initial target beyond rank r (buffer, frozen).
    """

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, rank: int):
        super().__init__()
        clipped = cfp_clip(weight)
        scales, zeros = find_params(clipped, bits, group_size, symmetric)
        rows, cols = clipped.shape
        grouped = clipped.reshape(rows, cols // group_size, group_size) / scales.unsqueeze(-1)
        frac = (grouped - torch.floor(grouped)).reshape(rows, cols)
        target = torch.logit((frac - GAMMA) / (ZETA - GAMMA))  # h(target) = frac; finite as frac is in [0, 1)
        u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
        rank = min(rank, rows, cols)
        root = s[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("weight", clipped)
        self.register_buffer("zeros", zeros)
        self.register_buffer("residual", (target - up @ down).float())
        self.log_scales = nn.Parameter(scales.log())
        self.up = nn.Parameter(up.float())
        self.down = nn.Parameter(down.float())

    def v(self) -> torch.Tensor:
        return self.residual + self.up @ self.down

    def offset(self) -> torch.Tensor:
        return rectified_sigmoid(self.v())

    def soft_weight(self) -> torch.Tensor:
        """The weight the training forward uses, (out, in) float32, differentiable."""
        return quantized_weight(self.weight, self.log_scales.exp(), self.zeros, self.offset(), self.bits)

    @torch.no_grad()
    def final_scales(self) -> torch.Tensor:
        """The learnt step sizes rounded to fp16 (as stored), float32 (out, groups)."""
        return self.log_scales.exp().clamp(min=2**-14).half().float()

    @torch.no_grad()
    def hardened_weight(self) -> torch.Tensor:
        return hardened_weight(self.weight, self.final_scales(), self.zeros, self.v(), self.bits)

    @torch.no_grad()
    def harden(self) -> QuantizedWeight:
        scales = self.final_scales()
        ints = hard_ints(self.weight, scales, self.zeros, self.v(), self.bits)
        return make_quantized(ints, scales, self.zeros, self.bits, self.symmetric)


# --- Cross-block reconstruction over a window ---------------------------------------------------------------

def run_window(blocks: list[nn.Module], linears: list[dict[str, nn.Linear]], weights: list[dict[str, torch.Tensor]],
               hidden: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
    """The window's output (batch, seqlen, hidden) with each named linear's weight replaced by weights[i][name].

    The blocks are called functionally: their own parameters enter detached and are never modified, so
    autograd reaches only the given weights.
    """
    for block, named, replaced in zip(blocks, linears, weights):
        local = _local_names(block, named)
        params = {name: p.detach() for name, p in block.named_parameters()}
        for name, weight in replaced.items():
            params[f"{local[name]}.weight"] = weight.to(named[name].weight.dtype)
        out = functional_call(block, params, (hidden.to(next(iter(params.values())).dtype),), block_kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _local_names(block: nn.Module, named: dict[str, nn.Linear]) -> dict[str, str]:
    """{full name: name inside the block} for the given linears."""
    inside = {id(module): name for name, module in block.named_modules()}
    return {name: inside[id(linear)] for name, linear in named.items()}


def _window_loss(output: torch.Tensor, target: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """MSE + kl_weight * KL(softmax(target) || softmax(output)) over the hidden dimension, mean over tokens."""
    output, target = output.float(), target.float()
    log_q = F.log_softmax(output, -1).reshape(-1, output.shape[-1])
    log_p = F.log_softmax(target, -1).reshape(-1, target.shape[-1])
    return F.mse_loss(output, target) + kl_weight * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def learn_window_cbq(blocks: list[nn.Module], linears: list[dict[str, nn.Linear]], inputs: torch.Tensor,
                     targets: torch.Tensor, block_kwargs: dict, config: CBQConfig) -> list[dict[str, LoRARounding]]:
    """Learn the window's step sizes and LoRA-Rounding; returns, per block, {full name: LoRARounding}.

    inputs: (N, T, h) the window's inputs in the compressed stream; targets: (N, T, h) the full-precision
    outputs of the window's last block. The blocks are left as they were.
    """
    roundings = [{name: LoRARounding(linear.weight.detach().float(), config.bits,
                                     resolve_group_size(linear.in_features, config.group_size), config.symmetric,
                                     config.rank).to(linear.weight.device)
                  for name, linear in named.items()} for named in linears]
    modules = [r for named in roundings for r in named.values()]
    params = [p for r in modules for p in r.parameters()]
    if config.iterations == 0 or not params:
        return roundings
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(config.batch_size, len(inputs))
    for step in range(config.iterations):
        index = torch.randperm(len(inputs), generator=generator)[:batch].to(inputs.device)
        weights = [{name: r.soft_weight() for name, r in named.items()} for named in roundings]
        output = run_window(blocks, linears, weights, inputs[index], block_kwargs)
        loss = _window_loss(output, targets[index], config.kl_weight)
        beta = beta_at(step, config.iterations)
        if beta is not None:
            loss = loss + config.reg_weight * sum(rounding_regulariser(r.offset(), beta) for r in modules)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return roundings


def quantize_window_cbq(blocks: list[nn.Module], linears: list[dict[str, nn.Linear]], inputs: torch.Tensor,
                        targets: torch.Tensor, block_kwargs: dict, config: CBQConfig) -> list[dict[str, QuantizedWeight]]:
    """CBQ on one window of blocks: per block, {full name: QuantizedWeight} of the hardened rounding.

    blocks: the window's decoder blocks in order; linears: per block {full name: nn.Linear} to quantize;
    inputs: (N, T, h) compressed-stream inputs of the first block; targets: (N, T, h) full-precision
    outputs of the last block; block_kwargs: what every block receives (position embeddings, mask, ...).
    """
    roundings = learn_window_cbq(blocks, linears, inputs, targets, block_kwargs, config)
    return [{name: r.harden() for name, r in named.items()} for named in roundings]
