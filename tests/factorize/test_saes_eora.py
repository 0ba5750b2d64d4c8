import pytest
import torch

from calibration import Statistics
from compress import SAES, SVDLLM, CompressError, EoRAFactorize
from compress.factorize.eora import eigenspace_lowrank, factorize_eora
from compress.factorize.saes_svd import aces_beta, factorize_saes, saes_lowrank
from compress.factorize.svd_llm import factorize_svd_llm
from compress.linalg import eigen_root
from tests.factorize.test_svd_llm import correlated_inputs

EPS32 = torch.finfo(torch.float32).eps


def mild_inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(tokens, n) correlated inputs whose Gram is well conditioned (no eigenvalue near EoRA's cut-off)."""
    g = torch.Generator().manual_seed(seed)
    mixing = (torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -1, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (mixing * scales)


def best_loss(target: torch.Tensor, x: torch.Tensor, rank: int) -> torch.Tensor:
    """Brute force min over rank-r M of ||(target - M) X||_F for X (in, tokens): the tail of SVD(target X)."""
    return torch.linalg.svdvals(target @ x)[rank:].square().sum().sqrt()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- EoRA

def test_eigen_root_is_a_root_and_pseudo_inverse():
    x = mild_inputs(8, 40)
    gram = x.T @ x
    root, inverse_lambda = eigen_root(gram)
    torch.testing.assert_close(root @ root.T, gram, rtol=1e-10, atol=1e-10)
    root_pinv = inverse_lambda[:, None] * root.T
    torch.testing.assert_close(root_pinv @ root, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-10)
    bad = gram.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        eigen_root(bad)


def test_eora_minimises_output_error_for_weight_and_for_quantization_error():
    weight = randn(12, 8, seed=1)
    x = mild_inputs(8, 40).T  # (in, tokens)
    gram = x @ x.T
    quant_error = weight - (weight * 4).round() / 4  # W - W_hat for a coarse round-to-nearest grid
    for target in (weight, quant_error):
        for rank in (1, 3, 5):
            lowrank = eigenspace_lowrank(target, gram, rank)
            assert lowrank.up.shape == (12, rank) and lowrank.down.shape == (rank, 8)
            method = factorize_eora(target, Statistics(gram), rank, EoRAFactorize()).lowrank
            assert torch.equal(method.up, lowrank.up) and torch.equal(method.down, lowrank.down)
            loss = ((target - lowrank.weight()) @ x).norm()
            assert torch.isclose(loss, best_loss(target, x, rank), rtol=1e-8)


def test_eora_on_a_tall_target_from_the_input_side_equals_the_product_route(monkeypatch):
    import compress.factorize.eora as eora
    from compress.linalg import top_left_singular

    monkeypatch.setattr(eora, "ROW_BLOCK", 16)  # 70 rows: five blocks of rows summed
    x = mild_inputs(20, 90, seed=4).T
    gram, target = x @ x.T, randn(70, 20, seed=5)
    root, _ = eigen_root(gram)
    for rank in (1, 4, 9):
        lowrank = eigenspace_lowrank(target.float(), gram, rank)
        U, S = top_left_singular(target.float().double() @ root, rank)  # the QR route on T Q' itself
        torch.testing.assert_close(lowrank.weight().double(), U @ U.T @ target.float().double(), rtol=0, atol=1e-5)
        loss = ((target.float().double() - lowrank.weight().double()) @ x).norm()
        assert torch.isclose(loss, best_loss(target.float().double(), x, rank), rtol=1e-5)


def test_eora_equals_svd_llm_on_a_well_conditioned_gram():
    weight = randn(12, 8, seed=2)
    x = mild_inputs(8, 40, seed=3)
    gram = x.T @ x
    for rank in (2, 4, 7):
        factorization = factorize_svd_llm(weight, Statistics(gram), rank, SVDLLM())
        svd_llm, damp = factorization.lowrank, factorization.damp
        assert damp == 0
        torch.testing.assert_close(eigenspace_lowrank(weight, gram, rank).weight(), svd_llm.weight(), rtol=1e-9,
                                   atol=1e-9)


def test_eora_on_an_ill_conditioned_gram_loses_only_the_truncated_eigen_energy():
    # correlated_inputs(8, 40) has an eigenvalue below lambda_max * n * eps_fp32: EoRA drops that direction on
    # purpose, so its loss lies between the optimum and the optimum plus the energy W sends along it.
    weight = randn(12, 8, seed=4)
    x = correlated_inputs(8, 40).T
    gram = x @ x.T
    eigenvalues, Q = torch.linalg.eigh(gram)
    dropped = eigenvalues <= eigenvalues.max() * 8 * EPS32
    assert dropped.any()
    dropped_energy = (weight @ Q[:, dropped] * eigenvalues[dropped].sqrt()).square().sum()
    for rank in (1, 3, 5):
        loss2 = ((weight - eigenspace_lowrank(weight, gram, rank).weight()) @ x).square().sum()
        best2 = best_loss(weight, x, rank).square()
        assert best2 * (1 - 1e-10) <= loss2 <= (best2 + dropped_energy) * (1 + 1e-10)


def test_eora_on_a_rank_deficient_gram_with_a_dead_channel_is_finite_and_optimal():
    x = correlated_inputs(16, 4, seed=5)  # 4 tokens for 16 channels
    x[:, 3] = 0  # a dead channel
    x = x.T  # (in, tokens)
    gram = x @ x.T
    weight = randn(8, 16, seed=6)
    scale = (weight @ x).norm()
    for rank in (1, 2, 3, 6):  # 6 > rank of the Gram (4): the optimum is zero error
        lowrank = eigenspace_lowrank(weight, gram, rank)
        assert torch.isfinite(lowrank.up).all() and torch.isfinite(lowrank.down).all()
        loss = ((weight - lowrank.weight()) @ x).norm()
        assert abs(loss - best_loss(weight, x, rank)) <= 1e-8 * scale


def test_eora_keeps_the_weight_dtype():
    x = mild_inputs(8, 40)
    lowrank = eigenspace_lowrank(randn(12, 8, seed=7).float(), (x.T @ x).float(), 3)
    assert lowrank.up.dtype == lowrank.down.dtype == torch.float32


# ---------------------------------------------------------------- SAES-SVD

def two_streams(n: int = 8, tokens: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, X^f) as (tokens, n): the compressed stream and the full-precision one, which differ by a correlated
    error."""
    x = correlated_inputs(n, tokens, seed=seed)
    drift = torch.eye(n, dtype=torch.float64) + 0.2 * randn(n, n, seed=seed + 100)
    return x, x @ drift + 0.05 * correlated_inputs(n, tokens, seed=seed + 200)


def stats(x: torch.Tensor, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H = X X^T and Delta = (X^f - X) X^T in column notation, from row-major token matrices."""
    return x.T @ x, (xf - x).T @ x


def test_saes_with_beta_zero_is_svd_llm():
    weight = randn(12, 8, seed=10)
    x, xf = two_streams()
    gram, cross = stats(x, xf)
    dead = gram.clone()
    dead[3, :] = dead[:, 3] = 0  # forces damping: the equality must hold with the ridge too
    for H in (gram, dead):
        for rank in (1, 3, 5):
            factorization = saes_lowrank(weight, H, cross, rank, beta=0.0)
            saes, beta, damp = factorization.lowrank, factorization.beta, factorization.damp
            reference = factorize_svd_llm(weight, Statistics(H), rank, SVDLLM())
            svd_llm, damp_llm = reference.lowrank, reference.damp
            assert beta == 0.0 and damp == damp_llm
            torch.testing.assert_close(saes.weight(), svd_llm.weight(), rtol=1e-10, atol=1e-10)
            method = factorize_saes(weight, Statistics(H, cross), rank, SAES(beta=0.0, ridge=0.0))
            assert method.beta == 0.0 and method.damp == damp and torch.equal(method.lowrank.up, saes.up)


def cealc(M: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, xf: torch.Tensor, alpha: float) -> torch.Tensor:
    """||(M - W) X||_F^2 + alpha ||M X - W X^f||_F^2 with X, X^f as (in, tokens)."""
    return ((M - weight) @ x).square().sum() + alpha * (M @ x - weight @ xf).square().sum()


def cealc_brute_force(weight, x, xf, alpha, rank):
    """argmin over rank-r M of CEALC = (1+alpha) ||M X - Z||^2 + const, Z = W (X + alpha X^f)/(1+alpha):
    project Z onto the row space of X (least squares), truncate to rank r, and map back with X^+."""
    Z = weight @ (x + alpha * xf) / (1 + alpha)
    Zp = torch.linalg.lstsq(x.T, Z.T).solution.T @ x
    U, S, Vh = torch.linalg.svd(Zp, full_matrices=False)
    Zr = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    return torch.linalg.lstsq(x.T, Zr.T).solution.T


def test_saes_with_a_fixed_beta_minimises_cealc():
    weight = randn(12, 8, seed=11)
    x, xf = two_streams(seed=1)
    gram, cross = stats(x, xf)
    x, xf = x.T, xf.T  # (in, tokens)
    for beta in (0.2, 0.5, 0.9):
        alpha = beta / (1 - beta)
        for rank in (1, 3, 5):
            factorization = saes_lowrank(weight, gram, cross, rank, beta=beta)
            lowrank, used, damp = factorization.lowrank, factorization.beta, factorization.damp
            assert used == beta and damp == 0
            ours = cealc(lowrank.weight(), weight, x, xf, alpha)
            best = cealc(cealc_brute_force(weight, x, xf, alpha, rank), weight, x, xf, alpha)
            assert ours <= best + 1e-8 * best.abs().clamp(min=1)
            assert torch.isclose(ours, best, rtol=1e-8)
            for k in range(5):
                up = lowrank.up + 1e-3 * randn(*lowrank.up.shape, seed=1000 + k)
                down = lowrank.down + 1e-3 * randn(*lowrank.down.shape, seed=2000 + k)
                assert ours <= cealc(up @ down, weight, x, xf, alpha)


def reference_rho(S: torch.Tensor, D: torch.Tensor, rank: int, beta: float) -> float:
    """ACES's rho(beta) with explicit projectors P_L = I - U_r U_r^T, P_R = I - V_r V_r^T."""
    U, _, Vh = torch.linalg.svd(S)
    P_L = torch.eye(len(S), dtype=S.dtype) - U[:, :rank] @ U[:, :rank].T
    P_R = torch.eye(S.shape[1], dtype=S.dtype) - Vh[:rank].T @ Vh[:rank]
    G, G_perp = S + beta * D, P_L @ (S + beta * D) @ P_R
    return (G_perp.square().sum() / G.square().sum()).item()


def test_aces_beta_minimises_rho_over_the_interval():
    interior = 0
    for seed in range(4):
        weight = randn(12, 8, seed=20 + seed)
        gram, cross = stats(*two_streams(seed=seed))
        root = torch.linalg.cholesky(gram)
        S = weight @ root  # W H C^(-T)
        D = weight @ cross @ torch.linalg.inv(root).T  # W Delta C^(-T), independent of the module's solves
        for rank in (1, 3, 5):
            for beta_max in (0.99, 0.5):
                beta = aces_beta(S, D, rank, beta_max)
                assert 0.0 <= beta <= beta_max
                grid = min(reference_rho(S, D, rank, t)
                           for t in torch.linspace(0, beta_max, 200, dtype=torch.float64).tolist())
                assert reference_rho(S, D, rank, beta) <= grid + 1e-9
                interior += 0 < beta < beta_max
                assert saes_lowrank(weight, gram, cross, rank, beta_max=beta_max).beta == pytest.approx(beta, abs=1e-12)
                config = SAES(beta_min=0.0, beta_max=beta_max, ridge=0.0)  # the closed form is unridged
                chosen = factorize_saes(weight, Statistics(gram, cross), rank, config).beta
                assert chosen == pytest.approx(beta, abs=1e-12)
    assert interior > 0  # the stationary-point branch was exercised, not only the endpoints


def test_aces_without_accumulated_error_is_svd_llm():
    weight = randn(12, 8, seed=30)
    x = correlated_inputs(8, 40, seed=2)
    gram, cross = stats(x, x)
    for rank in (1, 3, 5):
        factorization = saes_lowrank(weight, gram, cross, rank)
        lowrank, beta = factorization.lowrank, factorization.beta
        assert 0.0 <= beta <= 0.99
        svd_llm = factorize_svd_llm(weight, Statistics(gram), rank, SVDLLM()).lowrank
        torch.testing.assert_close(lowrank.weight(), svd_llm.weight(), rtol=1e-10, atol=1e-10)


def test_saes_rejects_a_beta_outside_the_unit_interval_and_keeps_the_dtype():
    x, xf = two_streams()
    gram, cross = stats(x, xf)
    weight = randn(12, 8, seed=31)
    with pytest.raises(ValueError):
        saes_lowrank(weight, gram, cross, 2, beta=1.0)
    with pytest.raises(ValueError):
        saes_lowrank(weight, gram, cross, 2, beta_max=1.0)
    for kwargs in (dict(beta=1.0), dict(beta=-0.1), dict(beta_max=1.0), dict(beta_min=0.8, beta_max=0.5)):
        with pytest.raises(CompressError):
            SAES(**kwargs)
    lowrank = saes_lowrank(weight.float(), gram.float(), cross.float(), 2).lowrank
    assert lowrank.up.dtype == lowrank.down.dtype == torch.float32
    assert torch.isfinite(lowrank.weight()).all()
