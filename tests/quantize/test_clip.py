"""MSE clipping of the grid (grid.find_params clip="mse", GPTQ's --mse search)."""
import pytest
import torch

from kernels.grid import NORM, find_params, quantize_ints, dequantize


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
