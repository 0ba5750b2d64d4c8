import pytest
import torch

from compress.layer import CompressedLinear
from compress.quantize.rtn import round_to_nearest


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("quantized_factors", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_equals_dense_weight(with_base, quantized_factors, with_bias):
    g = torch.Generator().manual_seed(0)
    out_features, in_features, rank = 40, 64, 8
    base = None
    if with_base:
        base = round_to_nearest(torch.randn(out_features, in_features, generator=g), 4, 32, symmetric=False)
    up, down = torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g)
    if quantized_factors:
        up, down = round_to_nearest(up, 3, 8, symmetric=True), round_to_nearest(down, 8, 64, symmetric=False)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    layer = CompressedLinear.from_parts(base, up, down, bias)

    dense_up = up.dequantize() if quantized_factors else up
    dense_down = down.dequantize() if quantized_factors else down
    weight = dense_up @ dense_down + (base.dequantize() if with_base else 0)
    x = torch.randn(3, 5, in_features, generator=g)
    expected = x @ weight.T + (bias if with_bias else 0)
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(layer.weight_approx(), weight, atol=1e-5)
    assert layer.rank == rank

    plain = layer(x)
    layer.keep_dense()  # dequantized once, on the first call: the same bits on every call
    assert torch.equal(layer(x), plain) and len(layer.dense_operands) == 1
    assert torch.equal(layer(x), plain)
    layer.keep_dense(False)
    assert layer.dense_operands is None and torch.equal(layer(x), plain)


def test_stored_bits_count_ints_scales_and_zeros():
    base = round_to_nearest(torch.randn(16, 64), 4, 32, symmetric=False)
    layer = CompressedLinear.from_parts(base, None, None)
    ints = 16 * 64 * 4
    scales = 16 * 2 * 16
    zeros = 2 * 4 * 32  # per group, the 16 rows' zeros padded to one run of 32 values at 4 bits: 4 words
    assert layer.stored_bits() == ints + scales + zeros


@pytest.mark.parametrize("seed", range(5))
def test_half_precision_activations(seed):
    g = torch.Generator().manual_seed(seed)
    layer = CompressedLinear.from_parts(round_to_nearest(torch.randn(8, 32, generator=g), 4, 32, False), None, None)
    x = torch.randn(2, 32, generator=g)
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    # bf16 rounds x and the dequantized weight once each (unit roundoff u = 2^-8; the float32 dequantization of an
    # fp16 scale times a small int is exact), the products accumulate in float32 (32 terms: 32 * 2^-24) and the
    # output is rounded once more. With s = |x| @ |W|^T >= |y|, the error is at most (3u + 4u^2 + 32 * 2^-24) * s.
    # Measured: at most 0.88u * s over 200 seeds. One zero step wrong in a group moves y by scale * sum |x| over it.
    u = 2.0**-8
    s = x.abs() @ layer.weight_approx().abs().T
    error = (got.float() - layer(x)).abs()
    assert (error <= (3 * u + 4 * u**2 + 32 * 2.0**-24) * s).all(), (error / s).max() / u
