import torch

from calibration import Statistics
from compress import SVDLLM
from compress.factorize.svd import truncated_lowrank
from compress.factorize.svd_llm import factorize_svd_llm
from compress.linalg import damped_cholesky, output_error


def correlated_inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(tokens, n) inputs with a strongly non-isotropic covariance, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mixing


def test_whitened_svd_equals_closed_form_optimum():
    # The best rank-r M minimising ||(W - M) X||_F is [W X]_r X^+ (X of full row rank): compare losses.
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(12, 8, generator=g, dtype=torch.float64)
    x = correlated_inputs(8, 40).T  # (in, tokens)
    gram = x @ x.T
    for rank in (1, 3, 5):
        lowrank = factorize_svd_llm(weight, Statistics(gram), rank, SVDLLM()).lowrank
        U, S, Vh = torch.linalg.svd(weight @ x, full_matrices=False)
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        loss = ((weight - lowrank.weight()) @ x).norm()
        assert torch.isclose(loss, (weight @ x - best).norm(), rtol=1e-8)
        assert torch.isclose(loss, S[rank:].square().sum().sqrt(), rtol=1e-8)  # SVD-LLM's theorem
        assert lowrank.up.shape == (12, rank) and lowrank.down.shape == (rank, 8)


def test_whitened_svd_beats_plain_svd_on_output_error_and_error_falls_with_rank():
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = correlated_inputs(32, 500)
    gram = x.T @ x
    previous = float("inf")
    for rank in (2, 4, 8, 16, 24):
        whitened_lowrank = factorize_svd_llm(weight, Statistics(gram), rank, SVDLLM()).lowrank
        whitened = output_error(weight, whitened_lowrank.weight(), gram)
        plain = output_error(weight, truncated_lowrank(weight, rank).weight(), gram)
        assert whitened < plain
        assert whitened < previous
        previous = whitened


def test_output_error_matches_activations():
    weight = torch.randn(6, 5, dtype=torch.float64)
    approx = weight + 0.1 * torch.randn(6, 5, dtype=torch.float64)
    x = torch.randn(30, 5, dtype=torch.float64)
    expected = ((x @ (weight - approx).T).norm() / (x @ weight.T).norm()).item()
    assert abs(output_error(weight, approx, x.T @ x) - expected) < 1e-10


def test_singular_gram_is_damped_not_fatal():
    x = correlated_inputs(16, 4)  # 4 tokens for 16 channels: rank-deficient Gram
    gram = x.T @ x
    gram[3, :] = gram[:, 3] = 0  # a dead channel
    root, damp = damped_cholesky(gram)
    assert damp > 0
    assert torch.isfinite(root).all()
    weight = torch.randn(8, 16, dtype=torch.float64)
    factorization = factorize_svd_llm(weight, Statistics(gram), 4, SVDLLM())
    assert factorization.damp == damp
    assert torch.isfinite(factorization.lowrank.weight()).all()
