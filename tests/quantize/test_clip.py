"""MSE clipping of the grid (grid.find_params clip="mse", GPTQ's --mse search)."""
import pytest
import torch

from kernels import grid
from kernels.grid import LEVELS, MAX_SHRINK, NORM, SHRINK_STEPS, find_params, mse_shrink, quantize_ints, dequantize


def group_errors(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, clip: str) -> torch.Tensor:
    scales, zeros = find_params(weight, bits, group_size, symmetric, clip)
    approx = dequantize(quantize_ints(weight, scales, zeros, bits), scales, zeros, group_size)
    rows, cols = weight.shape
    return (approx - weight).abs().pow(NORM).reshape(rows, cols // group_size, group_size).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clip_never_increases_a_groups_error(bits, symmetric):
    # heavy tails (Student t) as in LLM weights, plus a constant group and an all-zero group
    torch.manual_seed(bits)
    weight = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    weight[0, :32] = 0.0
    weight[1, :32] = 0.5
    minmax = group_errors(weight, bits, 32, symmetric, "minmax")
    mse = group_errors(weight, bits, 32, symmetric, "mse")
    assert (mse <= minmax).all()
    if bits <= 3:  # clipping the tails pays at low bit widths: most groups gain
        assert (mse < minmax).float().mean() > 0.5
        assert mse.sum() < 0.95 * minmax.sum()


def test_mse_clip_shrinks_the_range_of_an_outlier_group():
    weight = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 0.01
    weight[0, 3] = 0.2  # one outlier
    scales, _ = find_params(weight, 3, 64, False, "mse")
    minmax_scales, _ = find_params(weight, 3, 64, False, "minmax")
    assert scales.item() < minmax_scales.item()


def test_unknown_clip_is_refused():
    with pytest.raises(ValueError, match="clip must be one of minmax, mse"):
        find_params(torch.randn(2, 8), 4, 8, False, "percentile")


def plain_error(group: torch.Tensor, shrink: float, bits: int, symmetric: bool) -> float:
    """sum |w - q|^NORM of one group on its min-max range shrunk by `shrink`, written out plainly in float64."""
    wmin, wmax = min(float(group.min()), 0.0) * shrink, max(float(group.max()), 0.0) * shrink
    if symmetric:
        wmax = max(-wmin, wmax)
        wmin = -wmax
    maxq = 2**bits - 1
    scale = float(torch.tensor(max((wmax - wmin) / maxq if wmax > wmin else 1 / maxq, 2**-14)).half())
    zero = 2 ** (bits - 1) if symmetric else min(max(round(-wmin / scale), 0), maxq)
    ints = (group.double() / scale).round().add(zero).clamp(0, maxq)
    return float((scale * (ints - zero) - group.double()).abs().pow(NORM).sum())


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, False)])
def test_mse_search_matches_a_plain_coarse_to_fine_search(bits, symmetric):
    # the batched search against the search done group by group: each level's candidates around the best so far,
    # a candidate kept only when strictly better
    weight = torch.distributions.StudentT(3.0).sample((24, 128)) * 0.02
    found = mse_shrink(weight, bits, 32, symmetric)
    agree = 0
    for row in range(weight.shape[0]):
        for group in range(4):
            values = weight[row, 32 * group:32 * group + 32]
            best_shrink, best = 1.0, plain_error(values, 1.0, bits, symmetric)
            candidates = [1 - step / SHRINK_STEPS for step in range(LEVELS[0], int(MAX_SHRINK * SHRINK_STEPS) + 1,
                                                                      LEVELS[0])]
            for level in [None, *LEVELS[1:]]:
                if level is not None:
                    center = best_shrink
                    candidates = [min(max(center + sign * level / SHRINK_STEPS, 1 - MAX_SHRINK), 1) for sign in (-1, 1)]
                for shrink in candidates:
                    error = plain_error(values, shrink, bits, symmetric)
                    if error < best:
                        best_shrink, best = shrink, error
            chosen = float(found[row, group])
            agree += abs(chosen - best_shrink) < 1e-6
            # a tie broken the other way by the last ulps may pick another factor, never a worse one
            assert plain_error(values, chosen, bits, symmetric) <= best * (1 + 1e-5)
    assert agree >= 0.97 * weight.shape[0] * 4


def test_mse_search_in_row_chunks_gives_the_same_factors(monkeypatch):
    weight = torch.distributions.StudentT(3.0).sample((100, 256)) * 0.02
    whole = mse_shrink(weight, 3, 64, False)
    monkeypatch.setattr(grid, "SEARCH_ELEMENTS", 1000)  # a few rows at a time
    assert torch.equal(mse_shrink(weight, 3, 64, False), whole)
