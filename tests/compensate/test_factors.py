"""The compensation factors themselves: EoRA's eigen-directions on a wide ill-conditioned Gram, and `up` refit to a
quantized `down`."""
import torch

from calibration import Statistics
from compress import EoRA, GPTQ
from compress.compensate.eora import compensate_eora
from compress.stages import compensation, refit_up
from kernels.grid import QuantizedWeight


def ill_conditioned(n: int = 512, tokens: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (tokens, n) whose Gram has eigenvalues spread over 1 .. 1e-9 (as a wide layer fed by a few dominant
    channels), and that Gram in float64."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -4.5, n, dtype=torch.float64)  # singular values of X: eigenvalues 1 .. 1e-9
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (basis * spectrum) @ basis.T
    return x, x.T @ x


def test_eora_keeps_every_direction_above_float64_noise():
    x, gram = ill_conditioned()
    eigenvalues = torch.linalg.eigvalsh(gram)
    above_noise = int((eigenvalues > eigenvalues.max() * len(gram) * torch.finfo(torch.float64).eps).sum())
    above_float32 = int((eigenvalues > eigenvalues.max() * len(gram) * torch.finfo(torch.float32).eps).sum())
    assert above_float32 < 0.9 * above_noise  # the float32 cutoff would drop real directions here
    error = torch.randn(64, 512, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lowrank = compensate_eora(error, Statistics(gram), EoRA(rank=32))
    assert lowrank.directions == above_noise


def test_up_refit_to_the_quantized_down_lowers_the_output_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 96, generator=g) * torch.exp(torch.randn(96, generator=g))
    gram = x.double().T @ x.double()
    weight = torch.randn(48, 96, generator=g) * 0.05
    base = weight + 0.01 * torch.randn(48, 96, generator=g)  # a quantized base stand-in: W - base is the error
    statistics = Statistics(gram)

    def output_error(up, down):
        parts = [p.dequantize(torch.float64) if isinstance(p, QuantizedWeight) else p.double() for p in (up, down)]
        return ((weight - base).double() - parts[0] @ parts[1]) @ x.double().T

    config = EoRA(rank=16, factor_bits=3)
    up, down = compensation(weight, base, statistics, config, GPTQ(bits=4, group_size=32))
    refit = output_error(up, down).norm()
    lowrank = compensate_eora((weight - base), statistics, config)  # the same factors without the refit
    stale = output_error(lowrank.up, down.dequantize()).norm()
    assert refit < stale
    # the refit is the least-squares optimum for that down: a perturbed up is never better
    best = refit_up(weight - base, down, gram)
    assert output_error(best, down).norm() <= output_error(best + 1e-3 * torch.randn_like(best), down).norm()
