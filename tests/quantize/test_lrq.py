import pytest
import torch

from compress import LRQ, CompressError
from compress.quantize.lrq import (LRQParams, lrq_rounded, lrq_weight, quantize_block_lrq, quantize_window_lrq,
                                   train_lrq_block)
from compress.quantize.rtn import round_to_nearest
from kernels.grid import find_params, make_quantized, quantize_ints
from tests.quantize.blocks import block_error, tiny_block_problem
from tests.quantize.blocks import demo_block_problem as demo_block_problem_


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def block_problem():
    return tiny_block_problem(32)


@pytest.fixture(scope="module")
def demo_block_problem():
    return demo_block_problem_()


@pytest.mark.parametrize("bits", [3, 2])
def test_lrq_beats_rtn_on_the_block_output(demo_block_problem, bits):
    block, linears, inputs, targets, kwargs = demo_block_problem
    config = LRQ(bits=bits, group_size=32)
    lrq = quantize_block_lrq(block, linears, inputs, targets, kwargs, config)
    rtn = {name: round_to_nearest(linear.weight.detach().float(), bits, 32, False) for name, linear in linears.items()}
    lrq_error = block_error(block, linears, lrq, inputs, targets, kwargs)
    rtn_error = block_error(block, linears, rtn, inputs, targets, kwargs)
    print(f"demo block 0, {bits} bits g32: block error LRQ / RTN = {lrq_error / rtn_error:.3f}")
    assert lrq_error < rtn_error


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_iterations_is_rtn(block_problem, symmetric):
    block, linears, inputs, targets, kwargs = block_problem
    config = LRQ(bits=3, group_size=32, iterations=0, symmetric=symmetric)
    lrq = quantize_block_lrq(block, linears, inputs, targets, kwargs, config)
    for name, linear in linears.items():
        rtn = round_to_nearest(linear.weight.detach().float(), 3, 32, symmetric, config.clip)
        assert torch.equal(lrq[name].ints(), rtn.ints())
        assert torch.equal(lrq[name].scales, rtn.scales) and torch.equal(lrq[name].zeros(), rtn.zeros())
        assert lrq[name].symmetric == symmetric


def test_folded_weight_is_what_training_evaluated(block_problem):
    """The packed weight dequantizes bit for bit to W_hat of the learned parameters after training."""
    block, linears, inputs, targets, kwargs = block_problem
    config = LRQ(bits=3, group_size=32, iterations=30)
    quantizers = train_lrq_block(block, linears, inputs, targets, kwargs, config)
    packed = quantize_block_lrq(block, linears, inputs, targets, kwargs, config)
    for name, linear in linears.items():
        weight = linear.weight.detach().float()
        q = quantizers[name]
        assert q.L.abs().sum() > 0  # training moved S2 away from RTN
        with torch.no_grad():
            evaluated = q.weight(weight)
        assert torch.equal(q.fold(weight).dequantize(), evaluated)
        assert torch.equal(packed[name].dequantize(), evaluated)  # and the training is deterministic


def test_lrq_weight_matches_make_quantized_for_any_parameters():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=g)
    for bits, group_size, symmetric in [(2, 16, False), (3, 32, True), (4, 64, False), (8, 16, False)]:
        scales, zero = find_params(weight, bits, group_size, symmetric)
        s1 = (scales * torch.exp(0.2 * torch.randn(scales.shape, generator=g))).half().float()
        L, U = 0.3 * torch.randn(24, 5, generator=g), torch.randn(5, 64, generator=g)
        r, c = 0.1 * torch.randn(24, 1, generator=g), 0.1 * torch.randn(1, 64, generator=g)
        ints = lrq_rounded(weight, s1, zero, L, U, r, c, bits, group_size).to(torch.int32)
        packed = make_quantized(ints, s1, zero, bits, symmetric)
        assert ints.min() >= 0 and ints.max() <= 2**bits - 1 and torch.equal(packed.ints(), ints)
        assert torch.equal(packed.dequantize(), lrq_weight(weight, s1, zero, L, U, r, c, bits, group_size))
        # S2 = 0 is round-to-nearest on the same grid
        zeros_like = [torch.zeros_like(t) for t in (L, U, r, c)]
        assert torch.equal(lrq_rounded(weight, scales, zero, *zeros_like, bits, group_size).to(torch.int32),
                           quantize_ints(weight, scales, zero, bits))


def test_gradients_reach_every_parameter():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    q = LRQParams(weight, bits=3, group_size=16, symmetric=False, rank=4, generator=torch.Generator().manual_seed(0))
    q.L.data.normal_()  # away from L = 0, where U gets no gradient
    (q.weight(weight) * torch.randn(8, 32)).sum().backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bits", [2, 3])
def test_ints_on_grid_and_block_unchanged(block_problem, bits):
    block, linears, inputs, targets, kwargs = block_problem
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    config = LRQ(bits=bits, group_size=32, iterations=20, rank=64)
    packed = quantize_block_lrq(block, linears, inputs, targets, kwargs, config)
    for name, p in block.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None and p.requires_grad, name
    for name, linear in linears.items():
        ints = packed[name].ints()
        assert ints.shape == linear.weight.shape and ints.min() >= 0 and ints.max() <= 2**bits - 1
        assert packed[name].group_size == 32 and packed[name].scales.dtype == torch.float16
        zeros = packed[name].zeros()
        assert zeros.min() >= 0 and zeros.max() <= 2**bits - 1


def test_group_size_resolved_per_linear(block_problem):
    block, linears, inputs, targets, kwargs = block_problem
    packed = quantize_block_lrq(block, linears, inputs, targets, kwargs, LRQ(bits=4, group_size=48, iterations=2))
    for name, linear in linears.items():  # 48 divides neither 64 nor 128: the largest divisor below it, 32
        assert packed[name].group_size == 32
    packed = quantize_block_lrq(block, linears, inputs, targets, kwargs, LRQ(bits=4, group_size=0, iterations=2))
    assert all(q.scales.shape[1] == 1 for q in packed.values())


def test_window_of_one_block_is_the_block(block_problem):
    """The learned quantizers' interface: LRQ's window is one block, learned as quantize_block_lrq does."""
    block, linears, inputs, targets, kwargs = block_problem
    config = LRQ(bits=3, group_size=32, iterations=3)
    assert (config.window, config.overlap) == (1, 0)
    (window,) = quantize_window_lrq([block], [linears], inputs, targets, kwargs, config)
    single = quantize_block_lrq(block, linears, inputs, targets, kwargs, config)
    assert set(window) == set(single) == set(linears)
    for name in linears:
        assert torch.equal(window[name].dequantize(), single[name].dequantize())


def test_config_rejects_bad_values():
    assert LRQ() == LRQ(bits=4, group_size=128, symmetric=False, iterations=200, lr=1e-3, batch_size=4, seed=0,
                        rank=16)
    with pytest.raises(CompressError):
        LRQ(bits=5, group_size=32)
    with pytest.raises(CompressError):
        LRQ(bits=4, group_size=32, batch_size=0)
    for kwargs in (dict(rank=-1), dict(iterations=-1), dict(lr=0.0), dict(group_size=-1)):
        with pytest.raises(CompressError):
            LRQ(bits=4, **kwargs)
