"""The quantization grid, shared by every quantizer: group scales and zeros, round, clamp, pack, unpack.

Conventions (GPTQ's): a weight (out, in) is split along `in` into groups of `group_size` columns;
each (row, group) has a scale and an integer zero point, `w ~= scale * (q - zero)` with
`q` in [0, 2**bits - 1]. Symmetric grids use the fixed zero `2**(bits-1)` and store no zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
WORD = 32  # values are packed in runs of 32, each run into `bits` int32 words


DEQUANTIZE_BYTES = 1 << 26  # a block of rows dequantized at once: about 64 MiB of float32


@dataclass(frozen=True)
class QuantizedWeight:
    """Packed b-bit integers of a (rows, cols) weight with per-group scales (and zeros when asymmetric).

    qweight: (rows, ceil(cols/32) * bits) int32; scales: (rows, cols // group_size) fp16;
    qzeros: (groups, ceil(rows/32) * bits) int32, packed along the rows as GPTQ does, or None for a symmetric grid.
    g_idx: (cols,) int32 group of each column when it is not column // group_size (GPTQ's act-order with
    dynamic groups, `desc_act`), else None.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]
    g_idx: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.qzeros is None

    def zeros(self) -> torch.Tensor:
        """Integer zero points, (rows, groups)."""
        rows, groups = self.scales.shape
        if self.qzeros is None:
            return torch.full((rows, groups), 2 ** (self.bits - 1), dtype=torch.int32, device=self.scales.device)
        return unpack(self.qzeros, self.bits, rows).T

    def ints(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (rows, cols) weight, made a block of rows at a time: whole, the int and float temporaries of a
        405B MLP weight would be four times its 3.25 GiB."""
        rows, cols = self.shape
        out = torch.empty(rows, cols, dtype=dtype, device=self.qweight.device)
        for start, block in self.row_blocks(dtype):
            out[start:start + len(block)] = block
        return out

    def row_blocks(self, dtype: torch.dtype = torch.float32, rows: int | None = None):
        """(first row, the dense rows from there) for blocks of `rows` rows (default: DEQUANTIZE_BYTES of float32)."""
        total, cols = self.shape
        rows = rows or max(1, DEQUANTIZE_BYTES // (4 * cols))
        zeros = self.zeros()
        for start in range(0, total, rows):
            end = min(start + rows, total)
            ints = unpack(self.qweight[start:end], self.bits, cols)
            yield start, dequantize(ints, self.scales[start:end], zeros[start:end], self.group_size,
                                    self.g_idx).to(dtype)

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out


def pack(values: torch.Tensor, bits: int, rows_at_once: int = 1024) -> torch.Tensor:
    """Pack ints in [0, 2**bits) along the last dim: every run of 32 values becomes `bits` int32 words.

    A block of rows at a time: the int64 temporaries of a whole 70B down_proj (8192 x 28672) would be 3.5 GiB."""
    if len(values) > rows_at_once:
        return torch.cat([pack(chunk, bits, rows_at_once) for chunk in values.split(rows_at_once)])
    rows, cols = values.shape
    padded = -(-cols // WORD) * WORD
    values = torch.nn.functional.pad(values.to(torch.int64), (0, padded - cols))
    if WORD % bits == 0:  # no value straddles two words: shift each value to its offset in its word
        shifts = torch.arange(0, WORD, bits, device=values.device)
        return to_int32((values.reshape(rows, -1, WORD // bits) << shifts).sum(-1))
    # 3 bits: value k of each run of 32 starts at bit bits * k of the run's `bits` words (see unpack); the fields
    # are disjoint, so each word is the sum of the low parts starting in it and the high parts spilling into it
    runs = values.reshape(rows, -1, WORD)
    start = torch.arange(WORD, device=values.device) * bits
    index, offset = start // WORD, start % WORD
    low, high = (runs << offset) & 0xFFFFFFFF, runs >> (WORD - offset)
    words = torch.stack([(low * (index == word)).sum(-1) + (high * (index + 1 == word)).sum(-1)
                         for word in range(bits)], -1)
    return to_int32(words.reshape(rows, -1))


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same 32 bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack`: (rows, words) int32 -> (rows, cols) int32."""
    rows = packed.shape[0]
    if WORD % bits == 0:  # no value straddles two words: shift each word by each of its values' offsets
        shifts = torch.arange(0, WORD, bits, device=packed.device, dtype=torch.int32)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(rows, -1)[:, :cols]
    # 3 bits: each run of 32 values fills `bits` words; value k starts at bit bits * k of the run, in word
    # (bits * k) // 32, and where it straddles two words its high bits come from the next one
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(rows, -1, bits)
    start = torch.arange(WORD, device=packed.device) * bits
    index, offset = start // WORD, start % WORD
    low = words[:, :, index] >> offset
    high = words[:, :, (index + 1).clamp(max=bits - 1)] << (WORD - offset)
    return ((low | high) & (2**bits - 1)).reshape(rows, -1)[:, :cols].to(torch.int32)


def resolve_group_size(cols: int, group_size: int) -> int:
    """The requested group size if it divides `cols`, else the largest divisor of `cols` below it
    (0: one group per row)."""
    if group_size <= 0 or group_size >= cols:
        return cols
    return max(d for d in range(1, group_size + 1) if cols % d == 0)


CLIPS = ("minmax", "mse")
# GPTQ's MSE grid search (quant.py of IST-DASLab/gptq, as llm-compressor's MSE observer): shrink factors 1, 0.99, ...
# down to 1 - MAX_SHRINK, error measured as sum |w - q|^NORM (2.4 weighs large errors more than squares do). The
# factors are searched coarse to fine, each level's steps (in hundredths) around each group's best so far: every
# 9th, then +-3, then +-1 (13 error evaluations instead of 81; on SmolLM2's weights the summed error is 0.04-0.25%
# above trying every factor, at W2-W4, groups of 32 and 64).
SHRINK_STEPS, MAX_SHRINK, NORM, LEVELS = 100, 0.8, 2.4, (9, 3, 1)
# the first level: the min-max grid, then every LEVELS[0]-th factor
COARSE = [1.0] + [1 - step / SHRINK_STEPS for step in range(LEVELS[0], int(MAX_SHRINK * SHRINK_STEPS) + 1, LEVELS[0])]
SEARCH_ELEMENTS = 1 << 18  # errors evaluated at once: temporaries of 1 MB, in a core's cache


def find_params(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and integer zeros per (row, group): (rows, cols // group_size) each.

    clip "minmax": the grid spans each group's range; "mse": the range shrunk by the factor that minimises the
    group's error sum |w - q|^NORM, the min-max grid among the candidates (so never a larger error than it).
    """
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group_size, group_size).float()
    wmin, wmax = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    if clip == "minmax":
        return _range_grid(wmin, wmax, bits, symmetric)
    shrink = _best_shrink(grouped, wmin, wmax, bits, symmetric)
    return _range_grid(wmin * shrink, wmax * shrink, bits, symmetric)


def mse_shrink(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str = "mse") -> torch.Tensor:
    """(rows, groups) factors in [1 - MAX_SHRINK, 1]: per group, the shrink of its min-max range whose grid has the
    least error sum |w - q|^NORM (1, the min-max grid itself, unless another is strictly better)."""
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {clip!r}")
    rows, cols = weight.shape
    grouped = weight.reshape(rows, cols // group_size, group_size).float()
    wmin, wmax = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    if clip == "minmax":
        return torch.ones_like(wmin)
    return _best_shrink(grouped, wmin, wmax, bits, symmetric)


def _best_shrink(grouped: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, bits: int,
                 symmetric: bool) -> torch.Tensor:
    """mse_shrink on grouped (rows, groups, group_size) weights whose group ranges are [wmin, wmax]."""
    rows = max(1, SEARCH_ELEMENTS // (len(COARSE) * grouped.shape[1] * grouped.shape[2] or 1))  # a level at once
    return torch.cat([_best_shrink_rows(*part, bits, symmetric)
                      for part in zip(grouped.split(rows), wmin.split(rows), wmax.split(rows))])


def _best_shrink_rows(grouped: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, bits: int,
                      symmetric: bool) -> torch.Tensor:
    # each level's candidates in one evaluation, the best so far first: the first least error wins, so a candidate
    # replaces the best only when strictly better, and among equal ones the earlier (the larger factor)
    shape = (-1,) + (1,) * wmin.dim()
    shrinks = torch.tensor(COARSE, dtype=wmin.dtype, device=wmin.device).reshape(shape).expand(-1, *wmin.shape)
    best_shrink, best = _least_error(grouped, wmin, wmax, bits, symmetric, shrinks)
    for step in LEVELS[1:]:
        offsets = torch.tensor([-step, step], dtype=wmin.dtype, device=wmin.device).reshape(shape)
        candidates = (best_shrink + offsets / SHRINK_STEPS).clamp(1 - MAX_SHRINK, 1)
        best_shrink, best = _least_error(grouped, wmin, wmax, bits, symmetric, candidates, best_shrink, best)
    return best_shrink


def _least_error(grouped: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool,
                 shrinks: torch.Tensor, best_shrink: torch.Tensor | None = None,
                 best: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the first of (best_shrink, *shrinks) with the least error, and that error: shrinks (candidates,
    rows, groups), best (rows, groups) the error of best_shrink."""
    errors = _group_error(grouped, *_range_grid(wmin * shrinks, wmax * shrinks, bits, symmetric), bits)
    if best is not None:
        errors, shrinks = torch.cat([best[None], errors]), torch.cat([best_shrink[None], shrinks])
    index = errors.argmin(0, keepdim=True)
    return shrinks.gather(0, index)[0], errors.gather(0, index)[0]


def _range_grid(wmin: torch.Tensor, wmax: torch.Tensor, bits: int,
                symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid spanning [wmin, wmax] (wmin <= 0 <= wmax) per group: fp16-representable scales, int32 zeros."""
    maxq = 2**bits - 1
    if symmetric:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    span = wmax - wmin
    span = torch.where(span == 0, torch.ones_like(span), span)  # an all-zero group quantizes exactly with any scale
    # Scales are stored in fp16: round them here so that quantization and dequantization use the same values.
    scales = (span / maxq).clamp(min=2**-14).half().float()
    if symmetric:
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        zeros = torch.round(-wmin / scales).clamp(0, maxq)
    return scales, zeros.to(torch.int32)


def _group_error(grouped: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """sum |w - q|^NORM per (row, group) of grouped (rows, groups, group_size) on the grid (scales, zeros)."""
    scale = scales.unsqueeze(-1)
    zero = zeros.unsqueeze(-1).float().expand(*zeros.shape, grouped.shape[-1]).contiguous()
    # the search's inner loop, in place and in steps of the grid: |w - q| = s |clamp(round(w / s) + z, 0, maxq) - z -
    # w / s| (exact: the sums are of integers), and |e|^NORM as 2^(NORM log2|e|) (log 0 = -inf gives 0), within a few
    # ulps of the plain expression. The zeros taken to full size first: a clamp between tensors broadcast along the
    # last dimension, or exp and log, take several times longer on a CPU
    scaled = torch.div(grouped, scale)
    error = torch.round(scaled).add_(zero).clamp_(0, 2**bits - 1).sub_(zero).sub_(scaled)
    return error.abs_().log2_().mul_(NORM).exp2_().sum(-1).mul_(scales.pow(NORM))


def quantize_ints(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the grid: (rows, cols) ints in [0, 2**bits); scales/zeros are (rows, groups)."""
    rows, cols = weight.shape
    group_size = cols // scales.shape[1]
    grouped = weight.reshape(rows, -1, group_size).float()
    q = torch.round(grouped / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp(0, 2**bits - 1).reshape(rows, cols).to(torch.int32)


def dequantize(ints: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """scale * (q - zero) per element: (rows, cols) float32; column j uses group g_idx[j], or j // group_size."""
    rows, cols = ints.shape
    if g_idx is not None:
        g_idx = g_idx.long()
        return (ints - zeros[:, g_idx]).float() * scales.float()[:, g_idx]
    grouped = (ints.reshape(rows, -1, group_size) - zeros.unsqueeze(-1)).float()
    return (grouped * scales.float().unsqueeze(-1)).reshape(rows, cols)


def quantized_bits(rows: int, cols: int, bits: int, group_size: int, symmetric: bool, g_idx: bool = False) -> int:
    """Every stored bit of make_quantized's result for a (rows, cols) weight, without building it: the packed ints,
    fp16 scales, packed zeros (asymmetric) and int32 g_idx; group_size must divide cols."""
    def words(values: int) -> int:  # int32 words holding `values` packed b-bit values
        return -(-values // WORD) * bits

    groups = cols // group_size
    return 32 * (rows * words(cols) + (0 if symmetric else groups * words(rows)) + (cols if g_idx else 0)) \
        + 16 * rows * groups


def make_quantized(ints: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, symmetric: bool,
                   g_idx: torch.Tensor | None = None) -> QuantizedWeight:
    """Pack ints (rows, cols) with their (rows, groups) scales and zeros (and g_idx) into a QuantizedWeight."""
    rows, cols = ints.shape
    return QuantizedWeight(
        qweight=pack(ints, bits), scales=scales.to(torch.float16), qzeros=None if symmetric else pack(zeros.T, bits),
        bits=bits, group_size=cols // scales.shape[1], shape=(rows, cols),
        g_idx=None if g_idx is None else g_idx.to(torch.int32),
    )
