import pytest
import torch
from hypothesis import given, settings, strategies as st

from compress import RTN, CompressError
from compress.quantize.rtn import quantize_rtn, round_to_nearest
from kernels.grid import SUPPORTED_BITS, dequantize, find_params, pack, quantize_ints, resolve_group_size, unpack


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_pack_round_trips_exactly(bits, rows, cols, seed):
    values = torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    packed = pack(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (rows, -(-cols // 32) * bits)  # exactly `bits` bits per value, padded to 32 values
    assert torch.equal(unpack(packed, bits, cols), values.int())


def test_pack_uses_every_bit_of_the_word():
    values = torch.full((1, 32), 15)
    assert torch.equal(pack(values, 4), torch.full((1, 4), -1, dtype=torch.int32))


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_falls_as_bits_rise(symmetric):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = [(round_to_nearest(weight, bits, 128, symmetric).dequantize() - weight).norm().item()
              for bits in (2, 3, 4, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] / weight.norm().item() < 0.01


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_values_on_grid_and_within_half_step(bits, symmetric):
    weight = torch.randn(8, 96, generator=torch.Generator().manual_seed(bits))
    q = round_to_nearest(weight, bits, 32, symmetric)
    quantization = quantize_rtn(weight, None, RTN(bits=bits, group_size=32, symmetric=symmetric, clip="minmax"))
    assert quantization.damp is None and not quantization.damp_raised
    assert torch.equal(quantization.weight.qweight, q.qweight) and torch.equal(quantization.weight.scales, q.scales)
    ints = q.ints()
    assert ints.min() >= 0 and ints.max() <= 2**bits - 1
    scale = q.scales.float().repeat_interleave(32, dim=1)
    # Inside the grid's range rounding moves each weight by at most half a step.
    assert ((q.dequantize() - weight).abs() <= scale / 2 + 1e-6).float().mean() > 0.97
    assert q.symmetric == symmetric


def test_grid_reproduces_exact_grid_points():
    scales = torch.tensor([[0.5, 0.25]])
    zeros = torch.tensor([[3, 8]], dtype=torch.int32)
    ints = torch.tensor([[0, 15, 7, 3, 15, 2, 0, 9]])  # each group spans the whole grid, so min-max finds it again
    weight = dequantize(ints, scales, zeros, 4)
    s, z = find_params(weight, 4, 4, symmetric=False)
    assert torch.allclose(dequantize(quantize_ints(weight, s, z, 4), s, z, 4), weight, atol=1e-6)


def test_group_size_falls_back_to_largest_divisor():
    assert resolve_group_size(256, 128) == 128
    assert resolve_group_size(96, 128) == 96
    assert resolve_group_size(200, 128) == 100
    assert resolve_group_size(42, 32) == 21
    assert resolve_group_size(100, 0) == 100


def test_invalid_grids_are_refused():
    for kwargs in (dict(bits=5), dict(bits=1), dict(group_size=-8)):
        with pytest.raises(CompressError):
            RTN(**kwargs)
    assert RTN() == RTN(bits=4, group_size=128, symmetric=False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantized_bits_counts_what_make_quantized_stores(bits, symmetric):
    from kernels.grid import make_quantized, quantized_bits

    for rows, cols, group_size in ((40, 96, 32), (33, 64, 64), (7, 200, 8)):
        ints = torch.randint(0, 2**bits, (rows, cols), dtype=torch.int32)
        groups = cols // group_size
        scales, zeros = torch.rand(rows, groups) + 0.1, torch.randint(0, 2**bits, (rows, groups), dtype=torch.int32)
        for g_idx in (None, torch.arange(cols) // group_size):
            packed = make_quantized(ints, scales, zeros, bits, symmetric, g_idx)
            stored = sum(t.numel() * t.element_size() * 8 for t in packed.tensors().values())
            assert quantized_bits(rows, cols, bits, group_size, symmetric, g_idx is not None) == stored


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantizing_by_row_blocks_is_exact_and_large_bases_multiply_by_blocks(monkeypatch, bits, symmetric):
    """A quantized weight dequantized a few rows at a time (any block size, zeros packed across row blocks) equals
    the whole-tensor formula, and the reference kernel multiplies a base above LARGE_BYTES block by block, to
    float32 rounding of the dense product."""
    import kernels.reference as reference
    from kernels.grid import make_quantized

    generator = torch.Generator().manual_seed(3)
    rows, cols, group_size = 70, 96, 32
    ints = torch.randint(0, 2**bits, (rows, cols), dtype=torch.int32, generator=generator)
    scales = torch.rand(rows, cols // group_size, generator=generator) + 0.1
    zeros = torch.randint(0, 2**bits, (rows, cols // group_size), dtype=torch.int32, generator=generator)
    for g_idx in (None, torch.randperm(cols, generator=generator) // group_size):
        packed = make_quantized(ints, scales, zeros, bits, symmetric, g_idx)
        whole = dequantize(packed.ints(), packed.scales, packed.zeros(), group_size, packed.g_idx)
        assert torch.equal(packed.dequantize(), whole)
        for block in (1, 5, 33, 200):
            assert torch.equal(torch.cat([part for _, part in packed.row_blocks(rows=block)]), whole)
        x = torch.randn(2, 9, cols, generator=generator)
        dense = reference.lowrank_linear_reference(x, packed, None, None)
        monkeypatch.setattr(reference, "LARGE_BYTES", 64 * cols)  # blocks of 16 rows
        blocked = reference.lowrank_linear_reference(x, packed, None, None)
        monkeypatch.undo()
        assert torch.allclose(blocked, dense, rtol=1e-6, atol=1e-4) and torch.allclose(dense, x @ whole.T)
