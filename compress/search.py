"""`--bpw`: one size budget for the whole model, spent layer by layer on the form that costs the least loss.

Every targeted linear gets a menu of forms: quantized at 2/3/4/8 bits with groups of 32/64/128 columns; quantized at
2/3 bits and compensated by a low-rank term of several ranks; or low-rank factors alone. Each form has its exact
stored bits (ints, scales, zeros, g_idx, factors: what the report counts) and an estimated loss cost; a
multiple-choice knapsack (allocate.choose_forms, exact dynamic programming) picks one form per layer, with the least
summed cost whose bits fit `bpw` times the layers' weights.

The costs come from one cheap pass over the uncompressed model before compression (`plan_forms`): the first
calibration windows run forward through the blocks to the head, the loss's gradient runs back block by block, and
every linear yields its input Gram G and its output channels' gradient energy f_o = mean over tokens of
(dL/dy_o)^2. A form W' then costs

    1/2 sum_o f_o [(W - W') G (W - W')^T]_oo,

the Fisher (second-order) estimate of how much the calibration loss grows when that layer alone takes the form: the
layer's sensitivity, measured, weights its output error. That error is estimated without running the quantizer
(form_costs): RTN's own error for RTN; for GPTQ and GPTAQ a model of GPTQ's error (each group's RTN variance over
GPTQ's d_j^2), since RTN's error overstates GPTQ's 5-10x and differs in structure; what EoRA's rank-r term leaves of
it for a compensated form; the data-aware truncation plus the factors' grid for a factorized one.

Why a plan first, rather than carrying the remaining budget forward block by block: bits must move *between*
blocks (the first and last blocks and some down_proj matter far more than the rest), and a carry-forward search can
only hand an early block what later blocks have not claimed yet. The plan sees every layer before choosing. The
compression that follows runs block after block as always, so each block is calibrated on the outputs of the forms
chosen before it; the plan fixes only the forms. The recipe records them (`forms`), and a replay takes them as
they are, without planning again.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration import GramAccumulator
from compress.allocate import choose_forms
from compress.architectures import Architecture
from compress.compensate import CompensateConfig
from compress.compensate.eora import EoRA
from compress.errors import CompressError
from compress.factorize.svd_llm import SVDLLM
from compress.quantize import GridConfig
from compress.quantize.gptq import GPTQ, MAX_DAMP, column_order, working_hessian
from kernels.grid import dequantize, find_params, quantize_ints, quantized_bits, resolve_group_size

QUANTIZE_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
COMPENSATED = ((2, 128), (3, 128))  # (bits, group size) of the bases that may be compensated
COMPENSATE_RANKS = (16, 32, 64)
# factorized forms: ranks as shares of the rank whose fp16 factors hold as many numbers as the weight,
# out * in / (out + in), with 8-bit factors in groups of 128. Not 4-bit: a row of `up` spans the singular directions,
# whose scales differ by orders of magnitude, and on the demo such factors erred 1.3-140x more than their estimate.
FACTOR_SHARES = (1 / 8, 1 / 4, 1 / 2)
FACTOR_BITS = (8,)
FACTORIZE = SVDLLM()  # the factorization of factorized forms: data-aware truncation, what their costs assume
RANGE_ITERATIONS = 2  # eora_residuals' subspace iterations where it finds the top directions alone
SAMPLED_ROWS = 64  # rows of a larger layer on which a form's output error is measured (evenly spaced)
PLAN_TOKENS = 2048  # calibration tokens the plan reads (whole windows, at least one)
UNITS = 1 << 17  # budget steps of the knapsack: the bits lost to rounding are at most one step per layer


@dataclass(frozen=True)
class Form:
    """One layer's form: `bits` per weight in groups of `group_size` columns (as requested; a size that does not
    divide the layer falls back as everywhere), plus a compensation of `rank` (0: none); or, `factorized`, low-rank
    factors of `rank` alone, quantized at `bits` in groups of `group_size`."""

    bits: int
    group_size: int
    rank: int = 0
    factorized: bool = False

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "rank": self.rank, "factorized": self.factorized}

    @classmethod
    def from_dict(cls, data: dict) -> "Form":
        return cls(int(data["bits"]), int(data["group_size"]), int(data.get("rank", 0)),
                   bool(data.get("factorized", False)))

    @property
    def label(self) -> str:
        if self.factorized:
            return f"r{self.rank}:w{self.bits}"
        return f"w{self.bits}g{self.group_size}" + (f"+r{self.rank}" if self.rank else "")


def menu(shape: tuple[int, int]) -> list[Form]:
    """The candidate forms of a (out, in) layer: distinct after group-size fallback, ranks below its size."""
    out, inp = shape
    forms, seen = [], set()
    for bits in QUANTIZE_BITS:
        for group_size in GROUP_SIZES:
            key = (bits, resolve_group_size(inp, group_size))
            if key not in seen:
                seen.add(key)
                forms.append(Form(bits, group_size))
    forms += [Form(bits, group_size, rank) for bits, group_size in COMPENSATED for rank in COMPENSATE_RANKS
              if rank < min(out, inp) // 2]
    even = out * inp / (out + inp)
    forms += [Form(bits, 128, int(share * even), factorized=True) for share in FACTOR_SHARES for bits in FACTOR_BITS
              if int(share * even) >= 1]
    return forms


def form_configs(form: Form, quantize: GridConfig, compensate: CompensateConfig | None
                 ) -> tuple[int | None, SVDLLM | None, GridConfig, CompensateConfig | None]:
    """(rank, factorize, quantize, compensate) configs one layer runs with (stages.compress_linear): the recipe's
    methods at the form's sizes; a factorized form's factors come from FACTORIZE and are quantized on its grid."""
    grid = replace(quantize, bits=form.bits, group_size=form.group_size)
    if form.factorized:
        return form.rank, FACTORIZE, grid, None
    return None, None, grid, replace(compensate or EoRA(), rank=form.rank) if form.rank else None


def form_bits(form: Form, shape: tuple[int, int], quantize: GridConfig, compensate: CompensateConfig | None) -> int:
    """Every stored bit of a layer in this form, as CompressedLinear.stored_bits counts them."""
    out, inp = shape
    _, _, grid, compensation = form_configs(form, quantize, compensate)

    def quantized(rows: int, cols: int) -> int:
        group_size = resolve_group_size(cols, grid.group_size)
        g_idx = getattr(grid, "act_order", False) and not getattr(grid, "static_groups", True) and cols > group_size
        return quantized_bits(rows, cols, grid.bits, group_size, grid.symmetric, g_idx)

    if form.factorized:  # down (rank, in) and up (out, rank)
        return quantized(form.rank, inp) + quantized(out, form.rank)
    bits = quantized(out, inp)
    if compensation is not None:
        rank = min(compensation.rank, out, inp)
        if compensation.factor_bits is None:
            bits += 16 * rank * (out + inp)
        else:  # per output channel, asymmetric: down (rank, in), up (out, rank)
            bits += quantized_bits(rank, inp, compensation.factor_bits, inp, False)
            bits += quantized_bits(out, rank, compensation.factor_bits, rank, False)
    return bits


def rtn_error(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str) -> torch.Tensor:
    """W - RTN(W) on the recipe's grid (float32, the shape of `weight`)."""
    group_size = resolve_group_size(weight.shape[1], group_size)
    scales, zeros = find_params(weight, bits, group_size, symmetric, clip)
    return weight - dequantize(quantize_ints(weight, scales, zeros, bits), scales, zeros, group_size)


def form_costs(weight: torch.Tensor, gram: torch.Tensor, energy: torch.Tensor, forms: list[Form],
               quantize: GridConfig, column_weights: torch.Tensor | None = None) -> list[float]:
    """Each form's estimated loss increase 1/2 sum_o f_o [E G E^T]_oo for a (out, in) weight whose inputs have Gram
    `gram` and whose outputs gradient energy `energy` (out,); see the module's docstring.

    column_weights (in,): GPTQ's 1 / d_j^2 (gptq_column_weights) when the quantizer is GPTQ's family: its error is
    then modelled as independent rounding noise of each group's RTN variance in GPTQ's whitened basis, the noise
    made column j's by 1 / d_j^2 (on SmolLM2 within 10% of GPTQ's actual error at 3 and 4 bits, up to 1.5x under at
    2 bits; RTN's own error overstates it 5-10x, and its structure, which a low-rank term captures, GPTQ's lacks).
    """
    out, inp = weight.shape
    rows = torch.arange(out) if out <= SAMPLED_ROWS else torch.linspace(0, out - 1, SAMPLED_ROWS).round().long()
    gram = gram.float()

    @cache
    def root() -> torch.Tensor:  # G^1/2: read by RTN's compensation
        return symmetric_root(gram)

    @cache
    def group_variance(bits: int, group_size: int) -> torch.Tensor:
        """RTN's mean squared error per element of each (sampled row, group), spread over the columns."""
        size = resolve_group_size(inp, group_size)
        error = rtn_error(weight[rows], bits, group_size, quantize.symmetric, quantize.clip)
        return error.square().reshape(len(rows), -1, size).mean(-1).repeat_interleave(size, dim=1)

    @cache
    def quantization_cost(bits: int, group_size: int) -> float:
        if column_weights is None:  # RTN: its own error
            error = rtn_error(weight[rows], bits, group_size, quantize.symmetric, quantize.clip)
            row_errors = ((error @ gram) * error).sum(1).clamp(min=0).double()
        else:
            row_errors = (group_variance(bits, group_size) * column_weights).sum(1).double()
        return 0.5 * out / len(rows) * float((energy[rows].double() * row_errors).sum())

    @cache
    def compensated_residuals(bits: int, group_size: int) -> torch.Tensor:
        """residuals[r]: the weighted output error left by EoRA's rank-r term (its directions chosen unweighted)."""
        if column_weights is None:  # RTN: its own error, whitened
            whitened = rtn_error(weight, bits, group_size, quantize.symmetric, quantize.clip) @ root()
        else:  # GPTQ's whitened error: independent noise of the modelled variance (seeded: the same plan every run),
            # each row taking the variances of the nearest sampled row
            nearest = (torch.arange(out)[:, None] - rows[None, :]).abs().argmin(1)
            noise = torch.rand(out, inp, generator=torch.Generator().manual_seed(0)) - 0.5
            whitened = noise * (12 * group_variance(bits, group_size)[nearest] * column_weights).sqrt()
        return eora_residuals(whitened, energy, max(COMPENSATE_RANKS))

    @cache
    def truncation_spectrum() -> torch.Tensor:
        return residual_spectrum(weight, gram, energy)

    costs = []
    for form in forms:
        if form.factorized:  # truncation, plus about what the factors' grid costs the weight itself
            costs.append(0.5 * float(truncation_spectrum()[form.rank:].sum()) + quantization_cost(form.bits, 128))
        elif form.rank:
            costs.append(0.5 * float(compensated_residuals(form.bits, form.group_size)[form.rank]))
        else:
            costs.append(quantization_cost(form.bits, form.group_size))
    return costs


def gptq_column_weights(gram: torch.Tensor, config: GridConfig) -> torch.Tensor | None:
    """1 / d_j^2 per input column (original order), d the diagonal of the upper Cholesky factor of GPTQ's damped
    inverse Hessian in its processing order (act-order when the config has it); None for other quantizers.

    d_j^2 = [(H_F)^-1]_jj, F the columns from j on, so 1 / d_j^2 is the Schur complement of the columns after j: the
    squared diagonal of the lower Cholesky factor of H in reversed processing order. One factorization instead of
    GPTQ's two (Cholesky, triangular inverse); float32, since only the diagonal is read."""
    if not isinstance(config, GPTQ):
        return None
    perm, dead = column_order(gram, config.act_order, gram.device)
    order = torch.arange(len(gram)) if perm is None else perm
    reversed_hessian = working_hessian(gram, perm, dead[order], torch.float32, gram.device, reverse=True)
    mean_diagonal = float(reversed_hessian.diagonal().mean())
    damp = config.damp
    while True:  # damping raised as GPTQ raises it (inverse_hessian_factor) when the factorization fails
        damped = reversed_hessian + damp * mean_diagonal * torch.eye(len(gram), device=gram.device)
        lower, info = torch.linalg.cholesky_ex(damped)
        if not info and lower.diagonal().isfinite().all():
            break
        if damp >= MAX_DAMP:
            raise CompressError("--bpw: a layer's Hessian is not positive definite even with the largest damping; "
                                "the calibration statistics are broken (too few or non-finite tokens?)")
        damp = min(MAX_DAMP, damp * 10 if damp > 0 else 0.01)
    weights = torch.empty(len(gram), dtype=torch.float32)
    weights[order] = lower.diagonal().flip(0).square().cpu()
    return weights


def eora_residuals(whitened: torch.Tensor, energy: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """For a whitened error A (out, in) (E G^1/2, or any whitening: the result does not depend on which), sum_o f_o
    ||row o of A - A_r||^2 for every rank r up to `rank` (index r, float64; default every rank), A_r the best
    unweighted rank-r approximation, as EoRA takes it: its directions are the top right singular vectors of A,
    whatever the weights f.

    Exact (one eigh of the smaller side's product) unless `rank` plus as many again is below the smaller side: then
    the top `rank` directions come from a seeded randomized subspace iteration (RANGE_ITERATIONS passes, `rank`
    extra columns), O(out in rank) instead of O(n^3): an 8B layer's 9.8 s eigh becomes 0.46 s, and the residuals
    it gives are within 0.5% of the exact ones at every rank to `rank` on noise-like errors (tests/test_search.py)."""
    energy = energy.double()
    out, inp = whitened.shape
    total = float(energy @ whitened.double().square().sum(1))
    if rank is None or 2 * rank >= min(out, inp):
        if out <= inp:  # A V_r = U_r S_r: row o keeps sum_{i<=r} U_oi^2 s_i^2
            values, vectors = torch.linalg.eigh(whitened @ whitened.T)
            kept = vectors.flip(1).double().square() * values.flip(0).double().clamp(min=0)
        else:
            _, vectors = torch.linalg.eigh(whitened.T @ whitened)
            kept = (whitened @ vectors.flip(1)[:, :rank]).double().square()
        kept = kept[:, :rank]
    else:
        probe = torch.randn(inp, 2 * rank, generator=torch.Generator().manual_seed(0)).to(whitened)
        span = whitened @ probe
        for _ in range(RANGE_ITERATIONS):
            span = whitened @ (whitened.T @ torch.linalg.qr(span)[0])
        basis = torch.linalg.qr(span)[0]  # (out, 2 rank): spans A's top left singular directions
        projected = basis.T @ whitened
        values, vectors = torch.linalg.eigh(projected @ projected.T)
        top = (basis @ vectors.flip(1)[:, :rank]).double()  # U_r
        kept = top.square() * values.flip(0)[:rank].double().clamp(min=0)
    weighted = torch.cat([torch.zeros(1, dtype=torch.float64), (energy @ kept).cumsum(0)])
    return (total - weighted).clamp(min=0)


def residual_spectrum(error: torch.Tensor, gram: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Eigenvalues, descending, of F^1/2 E G E^T F^1/2 (F = diag(energy)), float64: the sum of those past r is the
    weighted output error that the best rank-r correction of E leaves. Computed on the smaller side of E: with more
    rows than columns from A^T A, A = F^1/2 E L for any G = L L^T (the nonzero eigenvalues of A A^T and A^T A agree);
    L is G's Cholesky factor, or G^1/2 when G is singular."""
    weighted = error.float() * energy.float().sqrt()[:, None]
    if weighted.shape[0] <= weighted.shape[1]:
        matrix = weighted @ gram.float() @ weighted.T
    else:
        lower, info = torch.linalg.cholesky_ex(gram.double())
        product = weighted @ (symmetric_root(gram) if info else lower.float())
        matrix = product.T @ product
    # float32, as the product was formed: twice as fast as float64 at no precision the product has
    return torch.linalg.eigvalsh(matrix).double().flip(0).clamp(min=0)


def symmetric_root(gram: torch.Tensor) -> torch.Tensor:
    """G^1/2 of a symmetric positive semi-definite matrix (float32)."""
    values, vectors = torch.linalg.eigh(gram.double())
    return (vectors * values.clamp(min=0).sqrt() @ vectors.T).float()


@dataclass
class LayerPlan:
    """What the plan measured of one layer: its menu, each form's stored bits and estimated loss cost."""

    shape: tuple[int, int]
    forms: list[Form]
    bits: list[int]
    costs: list[float]


def plan_forms(model: nn.Module, arch: Architecture, source, targets: list[list[str]], input_ids: torch.Tensor,
               bpw: float, quantize: GridConfig, compensate: CompensateConfig | None,
               progress: bool = True) -> tuple[dict[str, Form], dict]:
    """The form of every targeted layer for a budget of `bpw` bits per weight over them (see the module docstring),
    and what the plan measured for the report."""
    started = time.time()
    layers, seconds = measure_layers(model, arch, source, targets, input_ids, quantize, compensate, progress)
    names = list(layers)
    dense = sum(math.prod(layers[name].shape) for name in names)
    budget = int(bpw * dense)
    try:
        chosen, cost = choose_forms([layers[n].bits for n in names], [layers[n].costs for n in names], budget,
                                    units=UNITS)
    except ValueError:
        least = sum(min(layers[n].bits) for n in names) / dense
        raise CompressError(f"--bpw {bpw:g} is below the smallest forms of the menu ({least:.3f} bits per weight: "
                            "every layer in its smallest form)") from None
    forms = {name: layers[name].forms[j] for name, j in zip(names, chosen)}
    planned = sum(layers[name].bits[j] for name, j in zip(names, chosen)) / dense
    report = {"budget": bpw, "planned": planned, "estimated_loss_increase": cost,
              "plan_tokens": int(plan_windows(input_ids).numel()), "seconds": round(time.time() - started, 2),
              "seconds_passes": round(seconds["passes"], 2), "seconds_costs": round(seconds["costs"], 2)}
    return forms, report


def plan_windows(input_ids: torch.Tensor) -> torch.Tensor:
    """The calibration windows the plan reads: the first ones, PLAN_TOKENS tokens or at least one window."""
    return input_ids[:max(1, PLAN_TOKENS // input_ids.shape[1])]


def measure_layers(model: nn.Module, arch: Architecture, source, targets: list[list[str]], input_ids: torch.Tensor,
                   quantize: GridConfig, compensate: CompensateConfig | None,
                   progress: bool = True) -> tuple[dict[str, LayerPlan], dict[str, float]]:
    """Each targeted layer's menu with its forms' bits and costs, and the seconds spent on passes and on costs."""
    layers: dict[str, LayerPlan] = {}
    seconds = {"passes": 0.0, "costs": 0.0}
    mark, columns = time.time(), (None, None)
    for name, weight, gram, energy in layer_statistics(model, arch, source, targets, plan_windows(input_ids),
                                                       progress):
        seconds["passes"] += time.time() - mark
        mark = time.time()
        if columns[0] is not gram:  # the layers of a group share their Gram
            columns = (gram, gptq_column_weights(gram, quantize))
        shape = tuple(weight.shape)
        forms = menu(shape)
        layers[name] = LayerPlan(shape, forms, [form_bits(f, shape, quantize, compensate) for f in forms],
                                 form_costs(weight, gram, energy, forms, quantize, columns[1]))
        seconds["costs"] += time.time() - mark
        mark = time.time()
    return {name: layers[name] for block in targets for name in block}, seconds


def layer_statistics(model: nn.Module, arch: Architecture, source, targets: list[list[str]], ids: torch.Tensor,
                     progress: bool = True):
    """Forward through the uncompressed blocks, the calibration loss at the head, then backward block by block,
    one block in memory at a time: yields (name, weight (out, in) float32, input Gram (in, in) float64, output
    gradient energy (out,) float64) for every targeted layer, from the last block to the first."""
    blocks = model.get_submodule(arch.blocks)
    hidden, block_kwargs = source.block_inputs(model, arch, ids)
    inputs = []
    for index in tqdm(range(len(blocks)), desc="planning: forward", unit="block", disable=not progress):
        source.load(model, arch, range(index, index + 1))
        inputs.append(hidden)
        with torch.no_grad():
            hidden = torch.cat([block_output(blocks[index], window[None], block_kwargs) for window in hidden])
        source.unload(model, arch, index)
    with source.head(model, arch):
        grads = loss_gradients(model, arch, hidden, ids)
    for index in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="planning: backward", unit="block",
                      disable=not progress):
        source.load(model, arch, range(index, index + 1))
        block, prefix = blocks[index], f"{arch.blocks}.{index}."
        groups = [[local for local in group if prefix + local in targets[index]] for group in arch.groups]
        groups = [group for group in groups if group]
        grams, energies, grads = block_statistics(block, groups, inputs.pop(), grads, block_kwargs)
        for group in groups:
            for local in group:
                weight = block.get_submodule(local).weight.detach().float()
                yield prefix + local, weight, grams[group[0]], energies[local]
        source.unload(model, arch, index)


def block_output(block: nn.Module, batch: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
    out = block(batch, **block_kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def loss_gradients(model: nn.Module, arch: Architecture, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(last block's outputs), the loss being the sum over windows of each window's mean next-token cross
    entropy. A head tied to the embeddings (left on meta by a streamed checkpoint) reads the embedding weight."""
    norm, head = model.get_submodule(arch.norm), model.get_submodule(arch.head)
    weight = head.weight if not head.weight.is_meta else model.get_submodule(arch.embeddings).weight
    grads = []
    for window, tokens in zip(hidden, ids):
        with torch.enable_grad():
            x = window[None].detach().requires_grad_(True)
            logits = nn.functional.linear(norm(x), weight)[0].float()
            loss = nn.functional.cross_entropy(logits[:-1], tokens[1:].to(logits.device))
            grads.append(torch.autograd.grad(loss, x)[0])
    return torch.cat(grads)


def block_statistics(block: nn.Module, groups: list[list[str]], inputs: torch.Tensor, grads: torch.Tensor,
                     block_kwargs: dict) -> tuple[dict, dict, torch.Tensor]:
    """Backward through one block, window by window. groups: the block's targeted linears (names inside it), each
    group reading one tensor. Returns the input Gram of each group's first linear, every linear's output gradient
    energy (mean over tokens of the squared gradient per output channel), and the gradient at the block's inputs."""
    linears = {local: block.get_submodule(local) for group in groups for local in group}
    grams = {group[0]: GramAccumulator(linears[group[0]].in_features, device=inputs.device,
                                       product_dtype=torch.float32) for group in groups}
    energy = {local: torch.zeros(linear.out_features, dtype=torch.float64, device=inputs.device)
              for local, linear in linears.items()}

    def record_input(local: str):
        return lambda _module, args: grams[local].add(args[0].detach())

    def record_gradient(local: str):
        def record(_module, _grad_input, grad_output) -> None:
            grad = grad_output[0].detach()
            energy[local].add_(grad.reshape(-1, grad.shape[-1]).square().sum(0, dtype=torch.float64))
        return record

    handles = [linears[local].register_forward_pre_hook(record_input(local)) for local in grams]
    handles += [linear.register_full_backward_hook(record_gradient(local)) for local, linear in linears.items()]
    requires = [p.requires_grad for p in block.parameters()]
    block.requires_grad_(False)
    previous = []
    try:
        for window, grad in zip(inputs, grads):
            with torch.enable_grad():
                x = window[None].detach().requires_grad_(True)
                out = block_output(block, x, block_kwargs)
                previous.append(torch.autograd.grad(out, x, grad[None])[0])
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in zip(block.parameters(), requires):
            parameter.requires_grad_(flag)
    tokens = inputs.shape[0] * inputs.shape[1]
    return ({local: accumulator.finish().gram for local, accumulator in grams.items()},
            {local: e / tokens for local, e in energy.items()}, torch.cat(previous))


def count_forms(report: dict) -> dict[str, dict[str, int]]:
    """Per kind of layer (the name's last part: q_proj, ...), how many layers took each form."""
    counts: dict[str, dict[str, int]] = {}
    for name, entry in report["layers"].items():
        if "form" in entry:
            kind = counts.setdefault(name.rsplit(".", 1)[-1], {})
            kind[entry["form"]] = kind.get(entry["form"], 0) + 1
    return counts
