"""GPTQ (Frantar et al., ICLR 2023): quantize a linear's columns one at a time, each time pushing the
rounding error onto the columns not yet quantized through the inverse Hessian (Optimal Brain Surgeon).

Minimises the layer objective ||(W - Q) X||_F^2 = tr((W - Q) H (W - Q)^T), H = gram = sum x x^T, on
the shared min-max grid of kernels.grid. The algorithm is the reference's `fasterquant`
(IST-DASLab/gptq gptq.py), with the Hessian math in float64 (float32 where the Gram was kept in float32, see
compress.linalg.gram_dtypes) and the column loop in float32 as there:

  1. dead inputs (H_jj == 0): H_jj = 1 and W[:, j] = 0;
  2. act-order: process columns in order of decreasing H_jj (perm = argsort(diag H, descending));
  3. damping: H += lambda I, lambda = damp * mean(diag H), raised x10 (up to 1.0) while Cholesky fails;
  4. Hinv = upper Cholesky factor of H^-1;
  5. blocks of `block_size` columns: quantize column i, err = (w_i - q_i) / Hinv_ii,
     W[:, i:] -= err Hinv[i, i:] (inside the block at once, beyond it lazily after the block).
     The loop inside a block is `kernels.gptq_block`: a Triton kernel on CUDA (one launch per block instead of
     about ten per column), the torch loop elsewhere, with the same bits.

Groups. Dynamic groups (the default): at each group start in processing order the scale and zero are
found on that group's columns of the error-updated W, as the reference and GPTQModel do: W there holds
the updates of all earlier blocks but not yet those of earlier columns in the current block (which live
in the block's working copy), so with group_size = block_size (128) the grid sees fully updated columns.
Static groups: scales and zeros are found once on the original W (dead inputs zeroed), group g =
original columns [g*gs, (g+1)*gs); the loop reads each column's group through the permutation.

Storage. The result is a kernels.grid.QuantizedWeight in the original column order. Column j belongs to
group j // group_size without act-order, with act-order and static groups, and with one group per row.
Act-order with dynamic groups (and group_size < in) makes groups consecutive in the permuted order, so
the weight carries each column's group index `g_idx` (the GPTQ checkpoint convention, desc_act=True).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import kernels
from compress import distributed
from compress.errors import CompressError
from compress.linalg import (Spill, cholesky_, cholesky_rows, memory_bytes, nonfinite_count, pooled_solve, precision,
                             reverse_, shared_cholesky_, shared_upper_inverse_, spill_needed, transpose_,
                             triangular_inverse_)
from compress.quantize import GridConfig, Quantization
from kernels.grid import find_params, make_quantized

ROW_CHUNK_BYTES = 1 << 30  # GPTQ's float32 rows worked at once (a 405B down_proj's W: 3.25 GiB)

MAX_DAMP = 1.0  # the largest damping tried, as a fraction of the mean Hessian diagonal


@dataclass(frozen=True)
class GPTQ(GridConfig):
    """GPTQ on the grid of GridConfig. act_order: columns in order of decreasing Hessian diagonal;
    static_groups: group scales fixed on the original weight; damp: fraction of the mean Hessian diagonal added to
    it (raised automatically when a Cholesky factorisation fails, and reported)."""

    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.damp <= 1:
            raise CompressError(f"damp must be in [0, 1], got {self.damp}")


@dataclass(frozen=True)
class GPTAQ(GPTQ):
    """GPTAQ ("GPTQ v2", Li et al., ICML 2025): GPTQ against ||W X_fp - Q X_q||^2, the full-precision stream's
    inputs on one side and the compressed stream's on the other, from the cross statistics sum (x_fp - x) x^T.
    alpha scales the asymmetric term (1: the exact objective; the authors run their update with 0.25)."""

    alpha: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise CompressError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class GPTQInfo:
    """What one GPTQ run did.

    damp: the damping used, as a fraction of the mean diagonal of H; damp_raised: whether the requested
    damp had to be raised for the Cholesky factorisations to succeed; loss: the GPTQ layer loss
    sum (w - q)^2 / Hinv_ii^2 / 2 (equal to tr((W - Q)(H + lambda I)(W - Q)^T) / 2, W with dead inputs zeroed);
    g_idx: (in,) int64 group of each original column when it is not column // group_size (act-order with
    dynamic groups), else None.
    """

    damp: float
    damp_raised: bool
    loss: float
    g_idx: torch.Tensor | None = None


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ's output unpacked, in the original column order.

    ints: (out, in) uint8 in [0, 2**bits); scales: (out, groups) float32 (fp16-representable);
    zeros: (out, groups) int32; g_idx: (in,) int64 group of each column; dequantized: (out, in) float32,
    the Q the loop used, equal to scales[:, g_idx] * (ints - zeros[:, g_idx]); updated (only when asked for):
    (out, in) float32, each column as the loop rounded it (W with the earlier columns' errors pushed on; ints is its
    rounding).
    """

    ints: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequantized: torch.Tensor | None
    info: GPTQInfo
    updated: torch.Tensor | None = None


def column_order(gram: torch.Tensor, act_order: bool,
                 device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """GPTQ's processing order of the columns: with act-order by decreasing Hessian diagonal (dead inputs, H_jj = 0,
    count as 1, as the reference sets them before its argsort), else None (column order); and which columns are dead,
    in the original order."""
    diagonal = gram.diagonal().to(device, torch.float64)
    dead = diagonal == 0
    perm = torch.argsort(diagonal.masked_fill(dead, 1), descending=True) if act_order else None
    return perm, dead


def working_hessian(gram: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor, dtype: torch.dtype,
                    device: torch.device | str, reverse: bool = False, spill: Spill | None = None,
                    team: distributed.World | None = None) -> torch.Tensor:
    """A fresh working copy of H in processing order (one gather when permuted), its dead diagonal (`dead` in
    processing order) set to 1; with `reverse`, in the reverse of that order (the same one gather). With `spill`
    (the Gram lent out), the copy is made in the Gram's own memory from its file. With a `team` of ranks that factor
    it together, only the rows this rank holds for `shared_cholesky_` are copied (and the whole diagonal): each rank
    gathers its share, not all of H."""
    source = gram.to(device)
    order = perm
    if reverse or spill is not None or team is not None:
        order = perm if perm is not None else torch.arange(len(gram), device=source.device)
        order, dead = (order.flip(0), dead.flip(0)) if reverse else (order, dead)
    rows = None if team is None or team.size == 1 else cholesky_rows(len(gram), team)
    if rows is not None:  # a lent Gram's memory may hold an earlier try's factor: its diagonal is read from the file
        diagonal = (spill.diagonal() if spill is not None else source.diagonal())[order].to(dtype)
    if spill is not None:
        hessian = spill.gathered(order.cpu(), rows)
    elif rows is not None:
        hessian = torch.empty(len(gram), len(gram), dtype=dtype, device=source.device)
        for part in rows:
            hessian[part] = source[order[part][:, None], order]
    else:
        hessian = source[order[:, None], order].to(dtype) if order is not None else source.to(dtype, copy=True)
    if rows is not None:
        hessian.diagonal().copy_(diagonal)
    hessian.diagonal()[dead] = 1
    return hessian


def inverse_hessian_factor(hessian: Callable[[distributed.World], torch.Tensor], damp: float, pooled: bool = False,
                           dtype: torch.dtype | None = None) -> tuple[torch.Tensor, float, bool]:
    """Upper Cholesky factor U of (H + lambda I)^-1, lambda = damp * mean(diag H), (n, n), computed in H's working
    precision and returned in `dtype` (None: that precision).

    hessian(team) builds a fresh working copy of H in the reverse of the processing order (working_hessian's
    `reverse`, and `team`): with J the reversal and J H J = L L^T, U = J L^-1 J, so one Cholesky and one triangular
    inverse replace the reference's Cholesky, inverse and Cholesky (half the flops). It is done in place, so that
    besides the caller's Gram one (n, n) matrix is alive: an 8B model's down_proj has n = 14336, 1.5 GiB each. When a
    factorisation fails, damp is raised x10 (to at most MAX_DAMP) on a new copy; returns (U, damp used, raised).
    Ranks solving together (compress.distributed.team) share the work by rows: J H J = R^T R (R = L^T), then R^-1,
    and U = J R^-T J; or, `pooled` (compress.linalg.pooled_solve), the first rank factors alone on the threads of
    all while the others wait, and sends U.
    """
    team = distributed.team()
    if pooled and team.size > 1:
        return _pooled_inverse_hessian_factor(hessian, damp, team, dtype)
    tried = damp
    while True:
        work = hessian(team)
        diagonal = work.diagonal()
        mean_diag = diagonal.mean().item()
        diagonal += tried * mean_diag
        # the shared factorization answers alike on every rank (the same matrix, the same broadcast panels)
        if (shared_cholesky_(work, team) if team.size > 1 else cholesky_(work)) and not nonfinite_count(work):
            if team.size > 1:
                transpose_(reverse_(shared_upper_inverse_(work, team)))
            else:
                triangular_inverse_(work)
                reverse_(work)
            if not nonfinite_count(work):
                return work.to(dtype or work.dtype), tried, tried != damp
        del work, diagonal
        if tried >= MAX_DAMP:
            raise ValueError(f"GPTQ: the Hessian is not positive definite even with damping {tried:g} x mean diagonal "
                             f"({mean_diag:.3g}); the calibration statistics are broken "
                             "(too few or non-finite tokens?)")
        tried = min(MAX_DAMP, tried * 10 if tried > 0 else 0.01)


def _pooled_inverse_hessian_factor(hessian: Callable[[distributed.World], torch.Tensor], damp: float,
                                   team: distributed.World,
                                   dtype: torch.dtype | None) -> tuple[torch.Tensor, float, bool]:
    """inverse_hessian_factor on the team's first rank with every rank's threads, sent to the others (which build
    no working copy of H); a Hessian that no damping makes positive definite is refused on every rank alike."""
    factor, outcome = None, None
    if team.rank == 0:
        with distributed.pooled_threads(team), distributed.together(distributed.World()):
            try:
                factor, tried, raised = inverse_hessian_factor(hessian, damp, dtype=dtype)
                outcome = (tuple(factor.shape), factor.dtype, tried, raised)
            except ValueError as exc:
                outcome = str(exc)
    outcome = distributed.broadcast_object(outcome, 0)
    if isinstance(outcome, str):
        raise ValueError(outcome)
    shape, dtype, tried, raised = outcome
    if factor is None:
        factor = torch.empty(shape, dtype=dtype)
    distributed.broadcast_(factor, 0, team)
    return factor, tried, raised


def run_gptq(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, symmetric: bool,
             act_order: bool = False, static_groups: bool = False, damp: float = 0.01,
             block_size: int = 128, clip: str = "minmax", cross: torch.Tensor | None = None,
             alpha: float = 1.0, keep_updated: bool = False, spill: bool | None = None,
             dequantized: bool = True) -> GPTQResult:
    """GPTQ of weight (out, in) against gram (in, in) = sum x x^T; `group_size` must divide `in`.

    cross (in, in) = sum (x_fp - x) x^T: GPTAQ's asymmetric objective ||W X_fp - Q X||^2, solved as GPTQ on the
    least-squares target W* = W + alpha W cross (H + lambda I)^-1 (alpha 1: exactly that objective up to a constant).
    Returns the unpacked result in the original column order; `quantize_gptq` packs it. Besides the Gram and the
    inverse Hessian factor it holds the uint8 ints and W in float32 (which takes Q's values as the loop passes) at
    most ROW_CHUNK_BYTES of rows at a time (GPTQ's rows are independent given the factor; GPTAQ's shift takes W
    whole): a 405B down_proj's float32 W is 3.25 GiB, and every (out, in) array spared counts. Where the Gram and
    the factor would take more than half of the memory (compress.linalg.spill_needed; `spill` forces either way), the
    Gram waits in a temporary file while the factor takes its memory, and is back, unchanged, on return: the same
    results, one (n, n) matrix. dequantized=False leaves the result's dense Q out (None)."""
    rows, cols = weight.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"GPTQ: gram has shape {tuple(gram.shape)}, expected ({cols}, {cols}) "
                         f"for weight {tuple(weight.shape)}")
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"GPTQ: group_size {group_size} does not divide in_features {cols} "
                         "(use grid.resolve_group_size)")
    if damp < 0 or block_size <= 0:
        raise ValueError(f"GPTQ: damp must be >= 0 and block_size > 0, got damp={damp}, block_size={block_size}")
    if nonfinite_count(gram):
        raise ValueError("GPTQ: the gram matrix has non-finite entries (NaN or inf in the calibration statistics)")
    if spill is None:
        spill = gram.dtype in (torch.float32, torch.float64) and spill_needed(gram, memory_bytes(gram.device))
    lent = Spill(gram) if spill else None
    try:
        result = _run_gptq(weight, gram, lent, bits, group_size, symmetric, act_order, static_groups, damp,
                           block_size, clip, cross, alpha, keep_updated, dequantized)
    finally:
        if lent is not None:
            lent.restore()
    return result


def _run_gptq(weight: torch.Tensor, gram: torch.Tensor, lent: Spill | None, bits: int, group_size: int,
              symmetric: bool, act_order: bool, static_groups: bool, damp: float, block_size: int, clip: str,
              cross: torch.Tensor | None, alpha: float, keep_updated: bool, dequantized: bool) -> GPTQResult:
    rows, cols = weight.shape
    groups = cols // group_size
    perm, dead = column_order(gram, act_order, weight.device)
    working_dead = dead[perm] if act_order else dead
    shifted = cross is not None and bool(alpha)
    Hinv, damp_used, damp_raised = inverse_hessian_factor(
        lambda team: working_hessian(gram, perm, working_dead, precision(gram), weight.device, reverse=True,
                                     spill=lent, team=team),
        damp, pooled_solve(distributed.team(), cols, precision(gram), weight.device),
        None if shifted else torch.float32)
    # rows are independent given Hinv: W is worked ROW_CHUNK_BYTES at a time (GPTAQ's shift, in the Gram's
    # precision, reads the whole W), and ranks solving together each work their share of the rows
    team = distributed.team()
    bounds = distributed.row_bounds(rows, team)
    mine = range(bounds[team.rank], bounds[team.rank + 1])
    chunk = max(1, len(mine) if shifted else ROW_CHUNK_BYTES // (4 * cols))
    invperm = None if perm is None else torch.argsort(perm)
    ints = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)  # original column order
    scales = torch.empty(rows, groups, dtype=torch.float32, device=weight.device)
    zeros = torch.empty(rows, groups, dtype=torch.int32, device=weight.device)
    losses = torch.zeros(rows, dtype=torch.float64, device=weight.device)
    Q = torch.empty(rows, cols, dtype=torch.float32, device=weight.device) if dequantized else None
    updated = torch.empty(rows, cols, dtype=torch.float32, device=weight.device) if keep_updated else None
    for start in range(mine.start, mine.stop, chunk):
        part = slice(start, min(start + chunk, mine.stop))
        W = weight[part].to(precision(gram) if shifted else torch.float32, copy=True)
        W[:, dead] = 0
        if act_order:  # in place, a block of rows at a time: no second (out, in) copy
            for block in W.split(4096):
                block.copy_(block[:, perm])
        if shifted:
            W += alpha * asymmetric_shift(W, cross.to(W.device), perm, working_dead, Hinv)
            W, Hinv = W.float(), Hinv.float()
        found = gptq_rows(W, Hinv, perm, invperm, bits, group_size, symmetric, static_groups, block_size, clip,
                          keep_updated)
        W = None  # its storage holds Q now
        rows_ints, rows_q, scales[part], zeros[part], losses[part], rows_updated = found
        ints[part] = rows_ints if invperm is None else rows_ints[:, invperm]
        if Q is not None:
            Q[part] = rows_q if invperm is None else rows_q[:, invperm]
        if updated is not None:
            updated[part] = rows_updated if invperm is None else rows_updated[:, invperm]
        del found, rows_ints, rows_q, rows_updated
    del Hinv
    distributed.share_rows([t for t in (ints, scales, zeros, losses, Q, updated) if t is not None], bounds, team)

    g_idx = torch.arange(cols, device=weight.device) // group_size
    if act_order and not static_groups:
        g_idx = invperm // group_size  # original column j was processed at position invperm[j]
    info = GPTQInfo(damp=damp_used, damp_raised=damp_raised, loss=losses.sum().item(),
                    g_idx=g_idx if act_order and not static_groups and groups > 1 else None)
    return GPTQResult(ints=ints, scales=scales, zeros=zeros, g_idx=g_idx, dequantized=Q, info=info, updated=updated)


def gptq_rows(W: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor | None, invperm: torch.Tensor | None, bits: int,
              group_size: int, symmetric: bool, static_groups: bool, block_size: int, clip: str, keep_updated: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ's column loop over rows W (float32, in processing order, taken over: it ends holding Q) with the
    inverse Hessian factor Hinv: (ints, Q, scales, zeros, losses, updated), ints/Q/updated in processing order,
    scales/zeros per group of the original columns."""
    rows, cols = W.shape
    groups = cols // group_size
    if static_groups:  # on the weight the loop starts from, in the original column order, a block of rows at a time
        grids = [find_params(part if invperm is None else part[:, invperm], bits, group_size, symmetric, clip)
                 for part in W.split(4096)]
        scales, zeros = (torch.cat(parts) for parts in zip(*grids))
    else:
        scales = torch.zeros(rows, groups, dtype=torch.float32, device=W.device)
        zeros = torch.zeros(rows, groups, dtype=torch.int32, device=W.device)
    if perm is None:
        perm = torch.arange(cols, device=W.device)
    ints = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)  # processing order; at most 8 bits
    losses = torch.zeros(rows, dtype=torch.float64, device=W.device)
    updated = torch.zeros(rows, cols, dtype=torch.float32, device=W.device) if keep_updated else None

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if static_groups:
            column_groups = perm[i1:i2] // group_size
        else:
            # groups that start in this block: their grid from their columns of W, updated up to this block
            for start in range(-(-i1 // group_size) * group_size, i2, group_size):
                group = start // group_size
                scales[:, group:group + 1], zeros[:, group:group + 1] = find_params(
                    W[:, start:start + group_size], bits, group_size, symmetric, clip)
            column_groups = torch.arange(i1, i2, device=W.device) // group_size
        block_ints, block_q, Err1, block_losses = kernels.gptq_block(
            W[:, i1:i2], Hinv[i1:i2, i1:i2], scales[:, column_groups], zeros[:, column_groups], bits)
        ints[:, i1:i2] = block_ints
        losses += block_losses
        if updated is not None:
            updated[:, i1:i2] = block_q + Err1 * Hinv[i1:i2, i1:i2].diagonal()  # err = (w - q) / Hinv_ii
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # in place: no (out, in) temporary
        W[:, i1:i2] = block_q  # these columns are done: W holds their grid values (Q) from here on
    return ints, W, scales, zeros, losses, updated


def asymmetric_shift(W: torch.Tensor, cross: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor,
                     Hinv: torch.Tensor) -> torch.Tensor:
    """W cross (H + lambda I)^-1 in GPTQ's working order: W (out, in) permuted, cross (in, in) in the original order,
    Hinv the upper Cholesky factor U of the permuted (H + lambda I)^-1 = U^T U. Dead inputs carry no shift."""
    cross = cross.to(W.dtype)
    if perm is not None:
        cross = cross[perm[:, None], perm]
    cross = cross.masked_fill(dead[None, :], 0)
    return (W @ cross @ Hinv.T) @ Hinv


def quantize_gptq(weight: torch.Tensor, gram: torch.Tensor, config: GPTQ, block_size: int = 128,
                  cross: torch.Tensor | None = None) -> Quantization:
    """GPTQ of weight (out, in) against gram (in, in) = sum x x^T on the grid of `config`; with a GPTAQ config and
    the cross statistics (in, in) = sum (x_fp - x) x^T, against the asymmetric objective (see run_gptq).

    The config's group size must divide `in` (callers resolve it with grid.resolve_group_size); group_size == in
    is one group per row. A failing GPTQ (broken statistics) raises ValueError.
    """
    asymmetric = isinstance(config, GPTAQ) and cross is not None
    result = run_gptq(weight, gram, config.bits, config.group_size, config.symmetric, config.act_order,
                      config.static_groups, config.damp, block_size, config.clip, cross if asymmetric else None,
                      config.alpha if asymmetric else 0.0, dequantized=False)
    quantized = make_quantized(result.ints, result.scales, result.zeros, config.bits, config.symmetric,
                               result.info.g_idx)
    return Quantization(quantized, result.info.damp, result.info.damp_raised)
