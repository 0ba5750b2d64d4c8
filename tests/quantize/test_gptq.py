import pytest
import torch

from compress import GPTAQ, GPTQ, CompressError
from compress.quantize import Quantization
from compress.quantize.gptq import GPTQInfo, quantize_gptq, run_gptq
from compress.quantize.rtn import round_to_nearest
from kernels.grid import QuantizedWeight


def problem(rows=64, cols=128, tokens=512, seed=0):
    """A weight and the gram X^T X of inputs X (tokens, cols) as real activations: correlated through a few shared
    directions (rank 8), and with channel scales spread over orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    mixing = torch.eye(cols) + 0.1 * torch.randn(cols, 8, generator=g) @ torch.randn(8, cols, generator=g) / 8**0.5
    channel_scale = torch.exp(1.5 * torch.randn(cols, generator=g))  # a few channels dominate
    X = (torch.randn(tokens, cols, generator=g) @ mixing) * channel_scale
    return weight, X.double().T @ X.double()


def objective(weight, approx, gram):
    """||(W - Q) X||_F from the gram X^T X."""
    error = (weight.double() - approx.double())
    return torch.einsum("oi,ij,oj->", error, gram.double(), error).sqrt().item()


def damped(gram, damp):
    H = gram.double().clone()
    H[H.diagonal() == 0, H.diagonal() == 0] = 1
    return H + damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_on_the_layer_objective(bits, group_size, symmetric):
    weight, gram = problem()
    rtn = objective(weight, round_to_nearest(weight, bits, group_size, symmetric).dequantize(), gram)
    for act_order in (False, True):
        config = GPTQ(bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order,
                      static_groups=act_order)
        quantization = quantize_gptq(weight, gram, config)
        packed = quantization.weight
        assert isinstance(quantization, Quantization) and isinstance(packed, QuantizedWeight)
        assert not quantization.damp_raised and quantization.damp == 0.01 and packed.g_idx is None
        ratio = objective(weight, packed.dequantize(), gram) / rtn
        assert ratio < (0.85 if bits <= 3 else 1.0), (act_order, ratio)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_packed_weight_is_exactly_what_the_loop_used(act_order, symmetric, bits):
    weight, gram = problem(rows=16, cols=96)
    # block_size 40 and group_size 32 do not align: groups straddle blocks.
    kwargs = dict(act_order=act_order, static_groups=act_order, clip="mse" if act_order else "minmax")
    result = run_gptq(weight, gram, bits, 32, symmetric, **kwargs, block_size=40, keep_updated=True)
    info = result.info
    assert isinstance(info, GPTQInfo)
    # `updated` is what the loop rounded: each column on its grid gives the ints, and it is not the weight itself
    column_scales, column_zeros = result.scales[:, result.g_idx], result.zeros[:, result.g_idx]
    rounded = (torch.round(result.updated / column_scales) + column_zeros).clamp(0, 2**bits - 1)
    assert torch.equal(rounded.int(), result.ints.int()) and not torch.allclose(result.updated, weight)
    lean = run_gptq(weight, gram, bits, 32, symmetric, **kwargs, block_size=40)  # without `updated`: the same result
    assert lean.updated is None and torch.equal(lean.ints, result.ints)
    assert torch.equal(lean.dequantized, result.dequantized)
    quantization = quantize_gptq(weight, gram, GPTQ(bits=bits, group_size=32, symmetric=symmetric, **kwargs),
                                 block_size=40)
    packed = quantization.weight
    assert quantization.damp == info.damp and quantization.damp_raised == info.damp_raised
    assert torch.equal(packed.dequantize(), result.dequantized)
    assert torch.equal(packed.ints(), result.ints.int())
    assert packed.ints().min() >= 0 and packed.ints().max() <= 2**bits - 1
    assert packed.symmetric == symmetric and packed.group_size == 32 and packed.shape == (16, 96)
    # W - Q = E U with Hinv = U, so the reported loss is half the damped-Hessian error of the packed weight (up to
    # the float32 rounding of the column loop).
    direct = objective(weight, packed.dequantize(), damped(gram, info.damp)) ** 2 / 2
    assert info.loss == pytest.approx(direct, rel=2e-5)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_identity_gram_gives_rtn(group_size, symmetric):
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    for clip in ("minmax", "mse"):  # with act-order and static groups (the defaults) too
        packed = quantize_gptq(weight, torch.eye(128), GPTQ(bits=3, group_size=group_size, symmetric=symmetric,
                                                            clip=clip)).weight
        rtn = round_to_nearest(weight, 3, group_size, symmetric, clip)
        assert torch.equal(packed.ints(), rtn.ints())
    packed = quantize_gptq(weight, torch.eye(128), GPTQ(bits=3, group_size=group_size, symmetric=symmetric,
                                                        act_order=False, static_groups=False)).weight
    rtn = round_to_nearest(weight, 3, group_size, symmetric, "mse")
    assert torch.equal(packed.ints(), rtn.ints())
    assert torch.equal(packed.scales, rtn.scales)
    assert torch.equal(packed.zeros(), rtn.zeros())


def test_dead_input_and_rank_deficient_gram():
    weight, _ = problem(rows=16, cols=64)
    X = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))  # 20 tokens < 64 columns: rank 20
    X[:, 5] = 0  # a dead input channel
    gram = X.double().T @ X.double()
    config = GPTQ(bits=4, group_size=32, symmetric=False, act_order=True, static_groups=True)
    packed = quantize_gptq(weight, gram, config).weight
    info = run_gptq(weight, gram, 4, 32, symmetric=False, act_order=True, static_groups=True).info
    assert torch.isfinite(packed.dequantize()).all() and torch.isfinite(torch.tensor(info.loss))
    assert (packed.dequantize()[:, 5] == 0).all()  # dead columns are zeroed before quantization


def test_damping_is_raised_when_cholesky_fails_and_reported():
    weight, gram = problem(rows=8, cols=32, tokens=256)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    v = vectors[:, :1]
    # A negative eigenvalue of -5% of the mean diagonal (as from a badly accumulated gram): 1% damping cannot fix
    # it, 10% can.
    broken = gram + (-0.05 * gram.diagonal().mean() - eigenvalues[0]) * (v @ v.T)
    quantization = quantize_gptq(weight, broken, GPTQ(bits=4, group_size=32, symmetric=True))
    assert quantization.damp_raised and quantization.damp == pytest.approx(0.1)
    assert torch.isfinite(quantization.weight.dequantize()).all()

    hopeless = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalue -2 against a mean diagonal of 1
    with pytest.raises(ValueError, match="not positive definite"):
        quantize_gptq(torch.randn(4, 2), hopeless, GPTQ(bits=4, group_size=2, symmetric=True))


def test_act_order_with_dynamic_groups_carries_gidx():
    weight, gram = problem(rows=16, cols=96)
    quantized = quantize_gptq(weight, gram, GPTQ(bits=3, group_size=32, symmetric=False, act_order=True,
                                                 static_groups=False, clip="minmax")).weight
    result = run_gptq(weight, gram, 3, 32, symmetric=False, act_order=True)
    # the packed weight reads its groups through g_idx
    assert torch.equal(quantized.dequantize(), result.dequantized)
    g_idx, ints = result.info.g_idx, quantized.ints()
    assert g_idx.shape == (96,) and torch.equal(quantized.g_idx.long(), g_idx.long())
    # every group holds group_size columns
    assert torch.equal(torch.bincount(g_idx, minlength=3), torch.full((3,), 32))
    assert not torch.equal(g_idx, torch.arange(96) // 32)  # the groups really are out of column order here
    assert ints.min() >= 0 and ints.max() <= 7
    # Columns of the first group are those with the largest gram diagonal.
    largest = gram.diagonal().argsort(descending=True)[:32]
    assert set(g_idx.eq(0).nonzero().flatten().tolist()) == set(largest.tolist())
    rtn = objective(weight, round_to_nearest(weight, 3, 32, False).dequantize(), gram)
    assert objective(weight, result.dequantized, gram) < 0.8 * rtn
    # With one group per row act-order needs no g_idx.
    packed = quantize_gptq(weight, gram, GPTQ(bits=3, group_size=96, symmetric=False, act_order=True)).weight
    info = run_gptq(weight, gram, 3, 96, symmetric=False, act_order=True).info
    assert isinstance(packed, QuantizedWeight) and info.g_idx is None and packed.g_idx is None


def test_bad_group_size_is_rejected():
    with pytest.raises(ValueError, match="resolve_group_size"):
        quantize_gptq(torch.randn(4, 96), torch.eye(96), GPTQ(bits=4, group_size=64, symmetric=True))


def test_invalid_configs_are_refused():
    for kwargs in (dict(damp=-0.1), dict(damp=1.5), dict(bits=5), dict(group_size=-1)):
        with pytest.raises(CompressError):
            GPTQ(**kwargs)


def two_streams(rows=32, cols=96, tokens=1024, seed=3):
    """A weight, full-precision inputs X_fp and the compressed stream's X_q = X_fp + a correlated drift."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    x_fp = torch.randn(tokens, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    x_q = x_fp + 0.3 * torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    return weight, x_fp.double(), x_q.double()


def test_gptaq_is_gptq_when_the_streams_are_equal():
    weight, x_fp, _ = two_streams()
    gram = x_fp.T @ x_fp
    for act_order in (False, True):
        kwargs = dict(bits=3, group_size=32, act_order=act_order, static_groups=act_order)
        gptq = quantize_gptq(weight, gram, GPTQ(**kwargs)).weight
        gptaq = quantize_gptq(weight, gram, GPTAQ(**kwargs, alpha=1.0), cross=torch.zeros_like(gram)).weight
        assert torch.equal(gptaq.ints(), gptq.ints()) and torch.equal(gptaq.scales, gptq.scales)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptaq_fits_the_full_precision_outputs_better(bits):
    weight, x_fp, x_q = two_streams()
    gram, cross = x_q.T @ x_q, (x_fp - x_q).T @ x_q
    target = weight.double() @ x_fp.T

    def asymmetric_error(config, **kwargs):
        q = quantize_gptq(weight, gram, config, **kwargs).weight.dequantize(torch.float64)
        return (target - q @ x_q.T).norm().item()

    gptq = asymmetric_error(GPTQ(bits=bits, group_size=32))
    exact = asymmetric_error(GPTAQ(bits=bits, group_size=32, alpha=1.0), cross=cross)
    assert exact < (0.99 if bits == 2 else 0.95) * gptq  # at 2 bits the rounding error itself dominates
    # without the cross statistics (a stream not captured) it falls back to GPTQ
    assert asymmetric_error(GPTAQ(bits=bits, group_size=32, alpha=1.0)) == gptq


def test_gptaq_alpha_is_checked():
    with pytest.raises(CompressError, match="alpha must be in"):
        GPTAQ(alpha=1.5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_lent_gram_gives_the_same_bits_and_comes_back_unchanged(act_order, dtype):
    """With the Gram spilled to a file (the factor built in its memory, as for a 405B down_proj), GPTQ gives the
    same ints, grid and loss as with a separate copy, and the Gram holds its own values again afterwards; also after
    a failed Cholesky made it rebuild the factor with more damping, and after a bf16 weight."""
    weight, gram = problem(rows=32, cols=128, tokens=96)  # 96 tokens < 128 columns: damping decides, as when wide
    gram = gram.to(dtype)
    gram[7] = gram[:, 7] = 0  # a dead input
    eigenvalues, vectors = torch.linalg.eigh(gram.double())
    broken = (gram.double() + (-0.05 * gram.diagonal().mean() - eigenvalues[0]) * vectors[:, :1] @ vectors[:, :1].T)
    for matrix in (gram, broken.to(dtype)):
        for w in (weight, weight.bfloat16()):
            saved = matrix.clone()
            kept = run_gptq(w, matrix, 3, 32, symmetric=False, act_order=act_order, spill=False)
            lent = run_gptq(w, matrix, 3, 32, symmetric=False, act_order=act_order, spill=True)
            assert torch.equal(matrix, saved)
            assert torch.equal(kept.ints, lent.ints) and torch.equal(kept.scales, lent.scales)
            assert torch.equal(kept.zeros, lent.zeros) and torch.equal(kept.g_idx, lent.g_idx)
            assert (kept.info.loss, kept.info.damp) == (lent.info.loss, lent.info.damp)
    assert run_gptq(weight, broken.to(dtype), 3, 32, symmetric=False, spill=True).info.damp_raised


@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
def test_rows_worked_a_chunk_at_a_time_give_the_same_bits(monkeypatch, act_order, static_groups):
    """GPTQ's rows are independent given the inverse Hessian factor: worked 5 rows at a time (as a 405B down_proj's
    W is, 1 GiB at a time) every output is bit-identical to the whole W at once."""
    import compress.quantize.gptq as gptq

    weight, gram = problem(rows=23, cols=128, tokens=256)
    gram[3] = gram[:, 3] = 0  # a dead input
    options = dict(act_order=act_order, static_groups=static_groups, keep_updated=True)
    whole = run_gptq(weight, gram, 3, 32, False, **options)
    monkeypatch.setattr(gptq, "ROW_CHUNK_BYTES", 5 * 4 * 128)
    chunked = run_gptq(weight, gram, 3, 32, False, **options)
    for field in ("ints", "scales", "zeros", "g_idx", "dequantized", "updated"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field)), field
    assert whole.info.loss == pytest.approx(chunked.info.loss, rel=1e-12)
