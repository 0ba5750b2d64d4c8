"""The in-place decompositions that keep an 8B down_proj's (n, n) float64 matrices to one beside the Gram."""
import pytest
import torch

from calibration import Statistics
from compress.factorize.eora import eigenspace_lowrank
from compress.factorize.svd_llm import SVDLLM, factorize_svd_llm
from compress.linalg import (Spill, cholesky_, eigh_, gram_dtypes, lapack_threads, nonfinite_count, output_error,
                             reverse_, spill_needed, symmetrize_, top_left_singular, triangular_inverse_)
from compress.quantize.gptq import inverse_hessian_factor
from kernels.grid import WORD, pack, unpack
from tests.factorize.test_svd_llm import correlated_inputs


def gram(n: int = 40, seed: int = 0) -> torch.Tensor:
    x = correlated_inputs(n, 3 * n, seed)
    return x.T @ x


# float64 and float32 contiguous CPU tensors go through LAPACK in place (d- and s-routines)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("upper", [False, True])
def test_cholesky_in_place(dtype, upper):
    matrix = gram().to(dtype)
    work = matrix.clone()
    pointer = work.data_ptr()
    assert cholesky_(work, upper=upper)
    assert work.data_ptr() == pointer
    expected = torch.linalg.cholesky(matrix.double(), upper=upper)
    torch.testing.assert_close(work.double(), expected, rtol=1e-3 if dtype == torch.float32 else 1e-9, atol=1e-4)
    assert (work.triu(1) if not upper else work.tril(-1)).abs().max() == 0  # the other triangle is zeroed


def test_cholesky_reports_an_indefinite_matrix():
    matrix = gram()
    matrix[5, 5] = -1.0
    assert not cholesky_(matrix.clone())
    assert not cholesky_(matrix.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inverse_hessian_factor_in_place_chain(dtype):
    # GPTQ's factor: upper Cholesky factor U of (H + lambda I)^-1, U^T U = (H + lambda I)^-1, from H built reversed
    hessian = gram(32).to(dtype)
    built = []

    def build(team):
        built.append(hessian.flip(0, 1).contiguous())
        return built[-1]

    upper, damp, raised = inverse_hessian_factor(build, 0.01)
    assert not raised and upper.data_ptr() == built[-1].data_ptr()
    damped = hessian.double() + 0.01 * hessian.double().diagonal().mean() * torch.eye(32, dtype=torch.float64)
    tolerance = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(upper.double().T @ upper.double(), torch.linalg.inv(damped), **tolerance)
    assert upper.tril(-1).abs().max() == 0


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("lapack", [True, False])
def test_triangular_inverse_in_place(upper, lapack):
    matrix = gram(24)
    factor = torch.linalg.cholesky(matrix, upper=upper)
    work = factor.clone(memory_format=torch.contiguous_format)
    if not lapack:  # not contiguous: the torch path
        work = work.T.clone(memory_format=torch.contiguous_format).T
    triangular_inverse_(work, upper=upper)
    torch.testing.assert_close(work, torch.linalg.inv(factor), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (7, 3), (64, 64)])
def test_reverse_turns_the_matrix_half_way_round(shape):
    matrix = torch.randn(shape, dtype=torch.float64)
    expected = matrix.flip(0, 1)
    assert torch.equal(reverse_(matrix, chunk=5), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("exactly_symmetric", [True, False])
def test_eigh_uses_the_matrix_as_workspace_and_restores_it(dtype, exactly_symmetric):
    matrix = gram(30).to(dtype)
    if not exactly_symmetric:  # one bit off across the diagonal, as a GEMM-summed Gram may be: worked on a copy
        matrix[3, 7] = torch.nextafter(matrix[3, 7], torch.tensor(float("inf"), dtype=dtype))
    original = matrix.clone()
    eigenvalues, vectors = eigh_(matrix)
    assert torch.equal(matrix, original)  # bit for bit
    assert torch.all(eigenvalues[1:] >= eigenvalues[:-1])
    vectors = vectors.double()  # columns
    tolerance = dict(rtol=1e-3, atol=1e-2) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-8)
    torch.testing.assert_close((vectors * eigenvalues.double()) @ vectors.T, original.double(), **tolerance)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(30, dtype=torch.float64), rtol=0,
                               atol=1e-4 if dtype == torch.float32 else 1e-10)


def test_symmetrize_copies_the_lower_triangle_up():
    matrix = torch.randn(2500, 2500, dtype=torch.float64)  # more rows than one block
    lower = matrix.tril()
    symmetrize_(matrix, rows=1024)
    assert torch.equal(matrix.tril(), lower) and torch.equal(matrix, matrix.T)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (20, 20)])
def test_top_left_singular_matches_the_svd(shape):
    matrix = correlated_inputs(shape[1], shape[0], seed=3)  # (rows, cols) with a decaying spectrum
    U, S = top_left_singular(matrix, 6)
    U_ref, S_ref, _ = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(S, S_ref[:6], rtol=1e-9, atol=0)
    # singular vectors agree up to sign: compare the projectors
    torch.testing.assert_close(U @ U.T, U_ref[:, :6] @ U_ref[:, :6].T, rtol=0, atol=1e-8)


def pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """pack's reference, bit by bit: (rows, padded) int64 -> the words of the values' bits laid end to end."""
    rows, padded = values.shape
    bitstream = ((values.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(rows, padded * bits // WORD, WORD)
    words = (bitstream << torch.arange(WORD)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_equals_the_bitstream_and_unpacks(bits):
    values = torch.randint(0, 2**bits, (7, 96), generator=torch.Generator().manual_seed(bits))
    values[0] = 2**bits - 1  # every bit set: the words' sign bits and the fields that straddle two words
    torch.testing.assert_close(pack(values, bits), pack_bitstream(values.to(torch.int64), bits))
    assert torch.equal(unpack(pack_bitstream(values.to(torch.int64), bits), bits, 96), values)


def test_eigh_refuses_a_non_finite_matrix_instead_of_recursing():
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[3, 1] = float("nan")  # in the lower triangle: symmetrizing cannot make it equal its transpose
    with pytest.raises(ValueError, match="non-finite"):
        eigh_(matrix)


GIB = 2**30


def test_gram_dtypes_keep_float64_while_the_step_fits_and_turn_the_widest_to_float32_first():
    eight_b = {"self_attn.q_proj": 4096, "self_attn.o_proj": 4096, "mlp.gate_proj": 4096, "mlp.down_proj": 14336}
    assert set(gram_dtypes(eight_b, 1, 2, 23 * GIB).values()) == {torch.float64}  # 3.4 + 3.1 GiB of 11.5
    seventy_b = {"self_attn.q_proj": 8192, "self_attn.o_proj": 8192, "mlp.gate_proj": 8192, "mlp.down_proj": 28672}
    chosen = gram_dtypes(seventy_b, 1, 2, 23 * GIB)  # down_proj: 6.1 GiB in float64, and two working copies
    assert chosen["mlp.down_proj"] == torch.float32
    assert [chosen[k] for k in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj")] == [torch.float64] * 3
    # 4 x 0.5 GiB Grams + one working copy fit 4 GiB exactly; a byte less and the widest (then the first) goes
    four = {"a": 8192, "b": 8192, "c": 8192, "d": 8192}
    assert set(gram_dtypes(four, 1, 1, 5 * GIB).values()) == {torch.float64}
    assert list(gram_dtypes(four, 1, 1, 5 * GIB - 2).values()) == [torch.float32] + [torch.float64] * 3
    assert set(gram_dtypes(four, 2, 1, GIB).values()) == {torch.float32}  # nothing fits: all float32


def test_scipy_lapack_runs_with_torchs_thread_count():
    from threadpoolctl import threadpool_info

    import scipy.linalg  # noqa: F401 - loads scipy's BLAS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with lapack_threads():
            blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas and all(pool["num_threads"] == 1 for pool in blas)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rank", [16, 64])
def test_float32_statistics_give_factors_as_good_as_float64s_over_six_decades_of_channel_scales(rank):
    # input channels whose scales span 1e-3 to 1e3: the Gram's eigenvalues span twelve decades, beyond float32's
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, 256, dtype=torch.float64)
    x = torch.randn(2048, 256, dtype=torch.float64, generator=generator) * scales
    gram, weight = x.T @ x, torch.randn(128, 256, generator=generator)
    for factorize in (eigenspace_lowrank, svd_llm):
        errors = []
        for dtype in (torch.float64, torch.float32):
            statistics = gram.to(dtype)
            kept = statistics.clone()
            errors.append(output_error(weight, factorize(weight, statistics, rank).weight(), gram))
            assert torch.equal(statistics, kept)  # the equilibration is undone bit for bit
        assert errors[0] < 0.4 and abs(errors[1] / errors[0] - 1) < 1e-5


def svd_llm(weight: torch.Tensor, gram: torch.Tensor, rank: int):
    return factorize_svd_llm(weight, Statistics(gram), rank, SVDLLM()).lowrank


@pytest.mark.parametrize("span", [2, 4])
def test_float32_eora_factors_stay_as_small_as_float64s_when_the_inputs_fill_a_subspace(span):
    # 120-dimensional inputs in 256 channels of scales 10^-span .. 10^span: a rank-deficient Gram, as a real model's
    # attention inputs give. Through the pseudo-inverse of float32 eigenvalues, `down` grew 1000-10^6 times here
    # (the calibration error unmoved), and SmolLM2's compensated perplexity went to millions once it was quantized.
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2048, 120, dtype=torch.float64, generator=generator)
    x = (z @ torch.randn(120, 256, dtype=torch.float64, generator=generator)) * torch.logspace(
        -span, span, 256, dtype=torch.float64)
    gram, weight = x.T @ x, torch.randn(128, 256, generator=generator)
    wide, narrow = (eigenspace_lowrank(weight, gram.to(dtype), 16) for dtype in (torch.float64, torch.float32))
    for a, b in ((wide.down, narrow.down), (wide.up, narrow.up)):
        assert abs(b.abs().max() / a.abs().max() - 1) < 0.01
    errors = [output_error(weight, lowrank.weight(), gram) for lowrank in (wide, narrow)]
    assert abs(errors[1] / errors[0] - 1) < 1e-5


def test_nonfinite_count_counts_every_nan_and_inf_and_no_overflowing_sum():
    matrix = torch.full((3000, 7), 3e38)  # finite entries whose sum overflows float32: counted entry by entry
    assert nonfinite_count(matrix, rows=1024) == 0
    matrix[5, 2], matrix[2500, 0], matrix[2999, 6] = float("nan"), float("inf"), -float("inf")
    assert nonfinite_count(matrix, rows=1024) == 3
    assert nonfinite_count(torch.ones(10, dtype=torch.float64)) == 0


def test_a_spilled_matrix_gathers_any_order_and_restores_its_bits():
    matrix = torch.randn(300, 300, dtype=torch.float64)
    saved, order = matrix.clone(), torch.randperm(300, generator=torch.Generator().manual_seed(1))
    spill = Spill(matrix)
    assert spill.gathered(order, chunk=7) is matrix  # written into the matrix's own memory
    assert torch.equal(matrix, saved[order][:, order])
    assert torch.equal(spill.gathered(order.flip(0), chunk=300), saved[order.flip(0)][:, order.flip(0)])
    assert torch.equal(spill.restore(), saved) and torch.equal(matrix, saved)
    spill = Spill(matrix)
    matrix.fill_(7)  # the memory lent out: the diagonal comes from the file
    assert torch.equal(spill.diagonal(), saved.diagonal())
    spill.gathered(order, rows=[range(10, 20), range(250, 300)], chunk=7)  # only those rows: the others as they were
    for rows in (range(10, 20), range(250, 300)):
        assert torch.equal(matrix[rows], saved[order[rows]][:, order])
    assert (matrix[20:250] == 7).all() and (matrix[:10] == 7).all()
    assert torch.equal(spill.restore(), saved)
    with pytest.raises(ValueError, match="contiguous CPU"):
        Spill(saved.T)


def test_spill_is_needed_when_a_matrix_and_its_copy_pass_half_the_memory():
    matrix = torch.zeros(1000, 1000)  # 4 MB; with a copy 8 MB
    assert spill_needed(matrix, 15_999_999) and not spill_needed(matrix, 16_000_000)


def test_output_error_is_the_relative_output_norm_and_a_row_sample_of_a_tall_layer_estimates_it():
    """||(W - W')X|| / ||WX|| from the Gram equals the direct product of the inputs; a layer taller than max_rows is
    measured on evenly spaced rows, within a few percent of the exact figure when its rows err alike."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(64, 300, dtype=torch.float64, generator=generator)
    weight = torch.randn(1000, 64, dtype=torch.float64, generator=generator)
    approx = weight + 0.1 * torch.randn(1000, 64, dtype=torch.float64, generator=generator)
    direct = float(((weight - approx) @ x).norm() / (weight @ x).norm())
    assert output_error(weight, approx, x @ x.T, max_rows=1000) == pytest.approx(direct, rel=1e-10)
    sampled = output_error(weight, approx, x @ x.T, max_rows=250)
    assert sampled != output_error(weight, approx, x @ x.T, max_rows=1000)  # the sample is taken
    assert sampled == pytest.approx(direct, rel=0.05)


def test_an_in_place_transpose_equals_the_transpose():
    from compress.linalg import transpose_

    matrix = torch.randn(300, 300, dtype=torch.float64)
    expected = matrix.T.clone()
    assert transpose_(matrix, block=64) is matrix and torch.equal(matrix, expected)

