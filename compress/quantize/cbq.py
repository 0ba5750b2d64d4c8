"""CBQ (Ding et al., "CBQ: Cross-Block Quantization for Large Language Models", ICLR 2025), weight-only.

Three parts, as the paper's abstract names them:

1. CFP, coarse-to-fine pre-processing of outliers. Coarse: the candidates are the magnitudes above
   Q3 + lambda1 * IQR of their distribution. Fine: the sorted candidates (after the largest non-candidate)
   are cut into a lower and an upper set where gap^2 - lambda2 * (var(lower) + var(upper)) is largest, gap
   being the distance between the sets (min(upper) - max(lower)); the upper set are the outliers. Weight
   outliers are truncated to the largest non-outlier magnitude before the grid is found; activation
   outlier channels get a scale s = max / threshold, folded into the previous RMSNorm.
2. LoRA-Rounding (AdaRound's learnable rounding with a low-rank learnable part): per linear, on each
   (row, group) grid with step s and integer zero z,
       h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),
       W_hat = s * (clamp(floor(W / s) + h(V) + z, 0, 2**bits - 1) - z),
   regularised by mean(1 - |2h - 1|^beta), and hardened to h in {0, 1} (h >= 0.5, i.e. V >= 0) at the end.
   AdaRound initialises V to T(W/s) = logit((frac(W/s) - gamma) / (zeta - gamma)), so that h = frac(W/s)
   and W_hat = W. Here V = T(W/s) + up @ down - up0 @ down0: `up` (out, rank) and `down` (rank, in) are
   the paper's A1 and A2, initialised (up0, down0) to the best rank-r approximation of T(W/s) by SVD, and
   the only learnable rounding parameters (r (out + in) numbers per linear instead of AdaRound's out * in);
   the rest of the initial target is a fixed remainder, recomputed at the current step size without
   gradient. So h = frac(W/s) exactly at the start, and the rounding decisions the low-rank part does not
   move stay round-to-nearest of the current grid when s changes.
3. Cross-block reconstruction: the blocks of a window run in sequence on the compressed stream with the
   learnable rounding and learnable step sizes (s = exp(log_s), per (row, group), from the grid (config.clip) of
   the CFP-clipped weight; zeros stay fixed); the loss on the window's last output is the relative MSE to
   the full-precision outputs + KL(softmax(fp) || softmax(q)) over the hidden dimension + the rounding
   regulariser; Adam. After the warm-up V is divided by a temperature that falls geometrically from 1 to
   TEMPERATURE_END with the same schedule as beta, so the training forward becomes the hardened one.

What is not from the paper (its body, tables and code were not available; see METHODS.md, CBQ cards):
- zeta = 1.1, gamma = -0.1, regulariser weight 0.01, beta annealed linearly from 20 to 2 after a 20%
  warm-up without regulariser, Adam lr 1e-3: AdaRound / BRECQ public defaults.
- rank r = 5, iterations 200, batch 4: chosen for small calibration sets.
- lambda2 = 1.0, and the fine step's exact objective: the distance between the sets is their gap, squared
  so that it has the unit of the variances (the cut does not depend on the weight's scale), and the lower
  set starts at the largest non-candidate so that every candidate may be an outlier. With the distance of
  the set means instead, isolating the single largest value nearly always wins (the many candidates near
  the fence keep the lower mean low), and planted outliers beyond the first are missed. lambda1 = 1.5 is
  from one summary of the paper (LOW confidence).
- The loss normalisations: the MSE is divided by the targets' mean square and the regulariser is a mean
  over the window's weights (AdaRound sums both; with a summed regulariser at weight 0.01 and hidden
  states of small magnitude the regulariser outweighs the reconstruction by orders of magnitude and the
  learnt rounding is worse than round-to-nearest).
- The KL term is taken over the hidden dimension of the window's output (the paper's KL is on outputs;
  which dimension it normalises is not known): an approximation.
- The fixed remainder of V and the temperature (TEMPERATURE_END = 0.02). A rank-r V alone cannot express
  round-to-nearest: its hardened rounding is the sign pattern of a rank-r matrix, close to random rounding
  (about 4x RTN's mean squared error), and on the test model its window error was 1.6x RTN's at 3 bits.
  With the remainder but without the temperature the regulariser, acting through the rank-r part only,
  cannot harden the remainder: the soft forward stays close to the full-precision weights and the hardened
  weights are no better than RTN.
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

from compress import distributed
from compress.errors import CompressError
from compress.quantize import LearnedConfig
from kernels.grid import QuantizedWeight, dequantize, find_params, make_quantized, resolve_group_size

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the rectified sigmoid (not from the paper)
IQR_FACTOR = 1.5  # CFP's lambda1 (one summary of the paper, LOW confidence)
VARIANCE_WEIGHT = 1.0  # CFP's lambda2 (not from the paper)
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2  # AdaRound's annealing of the regulariser (not from the paper)
TEMPERATURE_END = 0.02  # V / temperature at the last step (not from the paper)


@dataclass(frozen=True)
class CBQ(LearnedConfig):
    """CBQ weight-only settings on the grid of GridConfig.

    From the paper: the structure (windows of blocks, LoRA-Rounding, CFP, MSE + KL loss). window = 2,
    overlap = 1 is the METHODS card's LOW-MED reading of the paper's default. Not from the paper: rank (5),
    iterations, lr, batch_size, reg_weight (AdaRound's 0.01, here on the regulariser's mean over the window's
    weights), kl_weight (1.0, the loss as the card writes it). batch_size counts calibration samples per Adam step.
    """

    rank: int = 5
    window: int = 2
    overlap: int = 1
    reg_weight: float = 0.01
    kl_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1 or self.window < 1:
            raise CompressError(f"CBQ needs rank >= 1 and window >= 1, got rank {self.rank}, window {self.window}")
        if not 0 <= self.overlap < self.window:
            raise CompressError(f"CBQ needs 0 <= overlap < window, got window {self.window}, overlap {self.overlap}")


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

    Coarse: candidates are the values above Q3 + lambda1 * IQR. Fine: the sorted candidates, preceded by the
    largest non-candidate c_0, are cut into a lower set {c_0 .. c_k} and an upper (outlier) set
    {c_(k+1) .. c_m}, k = 0 .. m-1, where (c_(k+1) - c_k)^2 - lambda2 * (var(lower) + var(upper)) is largest:
    the squared distance between the two sets (their gap) minus lambda2 times the intra-set variances.
    """
    values = magnitudes.detach().flatten().double().sort().values
    q1, q3 = (_quantile(values, q) for q in (0.25, 0.75))
    first = int(torch.searchsorted(values, q3 + IQR_FACTOR * (q3 - q1), right=True))  # index of the first candidate
    if first == len(values):
        return values[-1].item()
    points = values[max(first - 1, 0):]  # c_0 (when there is a non-candidate), c_1 .. c_m
    n = len(points)
    if n == 1:  # every value is a candidate: nothing to compare the outliers with
        return values[-1].item()
    s1, s2 = torch.cumsum(points, 0), torch.cumsum(points**2, 0)
    low = torch.arange(1, n, dtype=points.dtype, device=points.device)  # size of the lower set, per cut
    low_var = s2[:-1] / low - (s1[:-1] / low) ** 2
    up_var = (s2[-1] - s2[:-1]) / (n - low) - ((s1[-1] - s1[:-1]) / (n - low)) ** 2
    gap = points[1:] - points[:-1]
    score = gap**2 - VARIANCE_WEIGHT * (low_var.clamp(min=0) + up_var.clamp(min=0))
    return points[int(score.argmax())].item()


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


def rounding_target(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AdaRound's initial V, logit((frac(W / s) - gamma) / (zeta - gamma)), so that h(V) = frac(W / s).

    weight: (rows, cols); scales: (rows, groups). Finite: frac is in [0, 1], inside (gamma, zeta).
    """
    rows, cols = weight.shape
    grouped = weight.float().reshape(rows, scales.shape[1], -1) / scales.float().unsqueeze(-1)
    frac = (grouped - torch.floor(grouped)).reshape(rows, cols)
    return torch.logit((frac - GAMMA) / (ZETA - GAMMA))


def rounding_regulariser(offset: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): zero when every offset is 0 or 1."""
    return (1 - (2 * offset - 1).abs().pow(beta)).sum()


def schedule(step: int, iterations: int) -> tuple[float | None, float]:
    """(beta, temperature) at a step: (None, 1) during the warm-up; then beta falls linearly from BETA_START to
    BETA_END and the temperature geometrically from 1 to TEMPERATURE_END."""
    warmup = WARMUP * iterations
    if step < warmup:
        return None, 1.0
    progress = min((step - warmup) / max(iterations - warmup - 1, 1), 1.0)
    return BETA_START + (BETA_END - BETA_START) * progress, TEMPERATURE_END**progress


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
    rounds_up = (rectified_sigmoid(v) >= 0.5).float().reshape(rows, groups, -1)
    base = torch.floor(weight.float().reshape(rows, groups, -1) / scales.float().unsqueeze(-1))
    q = base + rounds_up + zeros.unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).reshape(rows, cols).to(torch.int32)


def hardened_weight(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, v: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """The weight the hardened rounding stands for: grid.dequantize of hard_ints, (rows, cols) float32."""
    return dequantize(hard_ints(weight, scales, zeros, v, bits), scales, zeros, weight.shape[1] // scales.shape[1])


class LoRARounding(nn.Module):
    """One linear's learnable grid: step sizes exp(log_scales) and V = rounding_target(W, s) + up @ down - up0 @ down0.

    weight: (out, in) the CFP-clipped weight (buffer); zeros: (out, groups) int32 (buffer);
    log_scales: (out, groups); up: (out, rank) and down: (rank, in), the paper's A1 and A2, learnable;
    up0, down0: their initial values (buffers), the best rank-r approximation of the initial target.
    """

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, rank: int,
                 clip: str = "minmax"):
        super().__init__()
        clipped = cfp_clip(weight)
        scales, zeros = find_params(clipped, bits, group_size, symmetric, clip)
        u, sv, vh = torch.linalg.svd(rounding_target(clipped, scales), full_matrices=False)
        rank = min(rank, *clipped.shape)
        root = sv[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("weight", clipped)
        self.register_buffer("zeros", zeros)
        self.register_buffer("up0", up.clone())
        self.register_buffer("down0", down.clone())
        self.log_scales = nn.Parameter(scales.log())
        self.up = nn.Parameter(up)
        self.down = nn.Parameter(down)

    def scales(self) -> torch.Tensor:
        return self.log_scales.exp()

    def v(self, scales: torch.Tensor) -> torch.Tensor:
        """V (out, in) on the grid with step `scales`; gradient only through up and down."""
        return rounding_target(self.weight, scales.detach()) + self.up @ self.down - self.up0 @ self.down0

    def offset(self, temperature: float = 1.0) -> torch.Tensor:
        """The soft offset h(V / temperature), (out, in)."""
        return rectified_sigmoid(self.v(self.scales()) / temperature)

    def soft_weight(self, temperature: float = 1.0) -> torch.Tensor:
        """The weight the training forward uses, (out, in) float32, differentiable in up, down and log_scales."""
        return quantized_weight(self.weight, self.scales(), self.zeros, self.offset(temperature), self.bits)

    @torch.no_grad()
    def final_scales(self) -> torch.Tensor:
        """The learnt step sizes rounded to fp16 (as stored), float32 (out, groups)."""
        return self.scales().clamp(min=2**-14).half().float()

    @torch.no_grad()
    def final_v(self) -> torch.Tensor:
        """V on the final (fp16) grid: what the hardening thresholds."""
        return self.v(self.final_scales())

    @torch.no_grad()
    def hardened_weight(self) -> torch.Tensor:
        return hardened_weight(self.weight, self.final_scales(), self.zeros, self.final_v(), self.bits)

    @torch.no_grad()
    def harden(self) -> QuantizedWeight:
        scales = self.final_scales()
        ints = hard_ints(self.weight, scales, self.zeros, self.v(scales), self.bits)
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


def window_loss(output: torch.Tensor, target: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """||q - fp||^2 / ||fp||^2 + kl_weight * KL(softmax(fp) || softmax(q)) over the hidden dimension (mean over
    tokens); output (q) and target (fp): (batch, seqlen, hidden)."""
    output, target = output.float(), target.float()
    relative_mse = (output - target).pow(2).sum() / target.pow(2).sum().clamp(min=torch.finfo(torch.float32).tiny)
    log_q = F.log_softmax(output, -1).reshape(-1, output.shape[-1])
    log_p = F.log_softmax(target, -1).reshape(-1, target.shape[-1])
    return relative_mse + kl_weight * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def learn_window_cbq(blocks: list[nn.Module], linears: list[dict[str, nn.Linear]], inputs: torch.Tensor,
                     targets: torch.Tensor, block_kwargs: dict, config: CBQ) -> list[dict[str, LoRARounding]]:
    """Learn the window's step sizes and LoRA-Rounding; returns, per block, {full name: LoRARounding}.

    inputs: (N, T, h) the window's inputs in the compressed stream; targets: (N, T, h) the full-precision
    outputs of the window's last block. The blocks are left as they were.
    """
    roundings = [{name: LoRARounding(linear.weight.detach().float(), config.bits,
                                     resolve_group_size(linear.in_features, config.group_size), config.symmetric,
                                     config.rank, config.clip).to(linear.weight.device)
                  for name, linear in named.items()} for named in linears]
    modules = [r for named in roundings for r in named.values()]
    if config.iterations == 0 or not modules:
        return roundings
    params = [p for r in modules for p in r.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    world = distributed.current()  # under torchrun: each rank draws its part of the batch from its own windows
    batch = distributed.share_of_batch(config.batch_size, len(inputs), world)
    count = sum(r.weight.numel() for r in modules)
    for step in range(config.iterations):
        beta, temperature = schedule(step, config.iterations)
        index = torch.randperm(len(inputs), generator=generator)[:batch].to(inputs.device)
        offsets = [{name: r.offset(temperature) for name, r in named.items()} for named in roundings]
        weights = [{name: quantized_weight(r.weight, r.scales(), r.zeros, offsets[i][name], r.bits)
                    for name, r in named.items()} for i, named in enumerate(roundings)]
        loss = window_loss(run_window(blocks, linears, weights, inputs[index], block_kwargs), targets[index],
                           config.kl_weight)
        if beta is not None:
            regulariser = sum(rounding_regulariser(h, beta) for named in offsets for h in named.values())
            loss = loss + config.reg_weight * regulariser / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(params, batch, world)
        optimizer.step()
    return roundings


def quantize_window_cbq(blocks: list[nn.Module], linears: list[dict[str, nn.Linear]], inputs: torch.Tensor,
                        targets: torch.Tensor, block_kwargs: dict,
                        config: CBQ) -> list[dict[str, QuantizedWeight]]:
    """CBQ on one window of blocks: per block, {full name: QuantizedWeight} of the hardened rounding.

    blocks: the window's decoder blocks in order; linears: per block {full name: nn.Linear} to quantize;
    inputs: (N, T, h) compressed-stream inputs of the first block; targets: (N, T, h) full-precision
    outputs of the last block; block_kwargs: what every block receives (position embeddings, mask, ...).
    """
    roundings = learn_window_cbq(blocks, linears, inputs, targets, block_kwargs, config)
    return [{name: r.harden() for name, r in named.items()} for named in roundings]
