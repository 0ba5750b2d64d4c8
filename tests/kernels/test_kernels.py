"""The Triton kernels against their pure-torch references (under TRITON_INTERPRET=1 on machines without a GPU).

Tolerance: max |kernel - reference| <= TOLERANCE[dtype] * max |reference|. Both sides round the dequantized
weight to the activation dtype; they differ in summation order, in where the partial sums are rounded
(the kernels round once, from fp32), and the interpreter rounds fp32 -> bf16 by truncation. fp32 activations
make those differences vanish, so the bit-level checks (every width, act-order, zeros) run in fp32.
"""
import pytest
import torch

import kernels
from compress.layer import CompressedLinear
from kernels.grid import make_quantized
from kernels.reference import lowrank_linear_reference, matmul_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 4e-2}  # about 3 and 5 epsilons of fp16, bf16


def random_quantized(rows: int, cols: int, bits: int, group_size: int, symmetric: bool, act_order: bool,
                     g: torch.Generator):
    """A QuantizedWeight with random ints, scales and zeros (and a random column -> group map under act-order)."""
    groups = cols // group_size
    ints = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32)
    scales = torch.rand(rows, groups, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, 2**bits, (rows, groups), generator=g, dtype=torch.int32)
    g_idx = torch.randperm(cols, generator=g) // group_size if act_order else None
    return make_quantized(ints, scales, zeros, bits, symmetric, g_idx)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    assert y.shape == reference.shape and y.dtype == reference.dtype
    return ((y.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")


@pytest.mark.parametrize("kernel", ["fused", "splitk"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric, act_order", [(True, False), (False, False), (False, True)])
def test_matmul_kernels_dequantize_like_the_reference(kernel, bits, symmetric, act_order):
    from kernels.fused_matmul import fused_matmul
    from kernels.splitk_matmul import splitk_matmul

    g = torch.Generator().manual_seed(bits)
    rows, out_features, in_features, rank = (33, 37, 72, 20) if kernel == "fused" else (3, 37, 72, 20)
    weight = random_quantized(out_features, in_features, bits, 24, symmetric, act_order, g)
    up = random_quantized(out_features, rank, bits, 10, not symmetric, act_order, g)
    x, t = torch.randn(rows, in_features, generator=g), torch.randn(rows, rank, generator=g)
    bias = torch.randn(out_features, generator=g)
    matmul = fused_matmul if kernel == "fused" else splitk_matmul
    expected = matmul_reference(x, weight, t, up, bias)
    assert relative_error(matmul(x, weight, t, up, bias), expected) <= TOLERANCE[torch.float32]
    assert relative_error(matmul(x, weight), matmul_reference(x, weight)) <= TOLERANCE[torch.float32]


def layer_parts(case: str, g: torch.Generator):
    """(base, up, down) of an (out=37, in=72) layer: quantized, dense or absent as `case` says."""
    out_features, in_features = 37, 72
    if case == "quantized base, rank 0":
        return random_quantized(out_features, in_features, 4, 24, False, False, g), None, None
    if case == "quantized base + dense factors":
        return (random_quantized(out_features, in_features, 4, 8, True, False, g),
                torch.randn(out_features, 5, generator=g) * 0.1, torch.randn(5, in_features, generator=g) * 0.1)
    if case == "act-order base + quantized factors":
        return (random_quantized(out_features, in_features, 3, 24, False, True, g),
                random_quantized(out_features, 20, 4, 20, True, False, g),
                random_quantized(20, in_features, 8, 72, False, False, g))
    if case == "quantized factors only":
        return (None, random_quantized(out_features, 6, 4, 6, False, False, g),
                random_quantized(6, in_features, 4, 24, False, False, g))
    raise ValueError(case)


CASES = ["quantized base, rank 0", "quantized base + dense factors", "act-order base + quantized factors",
         "quantized factors only"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [(1,), (3, 11)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowrank_linear_through_the_kernels(triton_path, case, batch, dtype):
    g = torch.Generator().manual_seed(len(case))
    base, up, down = layer_parts(case, g)
    x = torch.randn(*batch, 72, generator=g).to(dtype)
    bias = torch.randn(37, generator=g) if "factors" in case else None
    y = kernels.lowrank_linear(x, base, up, down, bias)
    assert y.shape == (*batch, 37)
    assert relative_error(y, lowrank_linear_reference(x, base, up, down, bias)) <= TOLERANCE[dtype]


def test_compressed_linear_forward_is_the_same_on_both_paths(monkeypatch):
    g = torch.Generator().manual_seed(0)
    parts = layer_parts("act-order base + quantized factors", g)
    layer = CompressedLinear.from_parts(*parts, torch.randn(37, generator=g))
    assert layer.kernel == "auto"
    x = torch.randn(2, 9, 72, generator=g).half()
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    reference = layer(x)
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    assert relative_error(layer(x), reference) <= TOLERANCE[torch.float16]
    # the same through the explicit choice, whatever the environment says
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    explicit = CompressedLinear.from_parts(*parts, layer.bias.data, kernel="triton")
    assert explicit.kernel == "triton"
    assert relative_error(explicit(x), reference) <= TOLERANCE[torch.float16]


def test_dispatch_picks_the_reference_for_cpu_tensors_unless_told(monkeypatch):
    x = torch.zeros(1, 4)
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert not kernels.use_triton(x)
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    assert kernels.use_triton(x)
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="COMPRESS_KERNELS"):
        kernels.use_triton(x)
    with pytest.raises(ValueError, match="kernel choice"):
        kernels.use_triton(x, kernel="cuda")


def test_explicit_choice_overrides_the_environment_and_auto_obeys_it(monkeypatch):
    x = torch.zeros(1, 4)
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    assert not kernels.use_triton(x, kernel="reference")
    assert kernels.use_triton(x, kernel="triton")
    assert kernels.use_triton(x, kernel="auto") and kernels.use_triton(x)
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    assert kernels.use_triton(x, kernel="triton")
    assert not kernels.use_triton(x, kernel="reference")
    assert not kernels.use_triton(x, kernel="auto") and not kernels.use_triton(x)
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda")  # an explicit choice does not even read the environment
    assert kernels.use_triton(x, kernel="triton") and not kernels.use_triton(x, kernel="reference")


def test_a_layers_kernel_picks_its_path_whatever_the_environment(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(len(args))
        return lowrank_linear_reference(*args)

    monkeypatch.setattr(kernels, "lowrank_linear_triton", spy)
    g = torch.Generator().manual_seed(1)
    parts = layer_parts("quantized base + dense factors", g)
    x = torch.randn(3, 72, generator=g)
    expected = lowrank_linear_reference(x, *CompressedLinear.from_parts(*parts).operands(), None)
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    assert torch.equal(CompressedLinear.from_parts(*parts, kernel="reference")(x), expected) and calls == []
    assert torch.equal(CompressedLinear.from_parts(*parts)(x), expected) and len(calls) == 1  # auto: the env var
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    assert torch.equal(CompressedLinear.from_parts(*parts, kernel="triton")(x), expected) and len(calls) == 2
    assert torch.equal(CompressedLinear.from_parts(*parts)(x), expected) and len(calls) == 2
    assert torch.equal(kernels.lowrank_linear(x, *CompressedLinear.from_parts(*parts).operands(), kernel="triton"),
                       expected) and len(calls) == 3


def gptq_block_inputs(rows: int, cols: int, bits: int, g: torch.Generator):
    """A GPTQ block as run_gptq hands it over: W1 a strided slice of W, Hinv1 the diagonal block of the upper
    Cholesky factor of a real inverse Hessian, a grid per column; column 0 holds exact ties of the rounding."""
    x = torch.randn(4 * cols, cols + 8, generator=g, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.linalg.inv(x.T @ x + torch.eye(cols + 8, dtype=torch.float64)), upper=True)
    W = torch.randn(rows, cols + 8, generator=g, dtype=torch.float64)
    scale = (torch.rand(rows, cols, generator=g) * 0.3 + 0.05).half().float()
    zero = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32)
    zero[:, 0] = 2 ** (bits - 1)
    W[:, 4] = scale[:, 0].double() * (torch.randint(0, 2, (rows,), generator=g) - 0.5)  # +-0.5 steps: ties to 0
    return W[:, 4:4 + cols], upper[4:4 + cols, 4:4 + cols], scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows, cols", [(37, 64), (16, 40), (5, 128)])
def test_gptq_block_kernel_gives_the_references_bits(bits, rows, cols):
    from kernels.gptq_triton import gptq_block_triton
    from kernels.reference import gptq_block_reference

    W1, Hinv1, scale, zero = gptq_block_inputs(rows, cols, bits, torch.Generator().manual_seed(bits * cols))
    before = W1.clone()
    expected = gptq_block_reference(W1, Hinv1, scale, zero, bits)
    got = gptq_block_triton(W1, Hinv1, scale, zero, bits)
    assert torch.equal(W1, before)
    assert torch.equal(expected[0][:, 0], zero[:, 0])  # the ties went to the even integer, 0
    for name, a, b in zip(("ints", "Q", "Err1", "losses"), got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_gptq_runs_its_blocks_through_the_kernel_with_the_same_result(monkeypatch):
    from compress.quantize.gptq import run_gptq

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 96, generator=g, dtype=torch.float64)
    gram, weight = x.T @ x, torch.randn(24, 96, generator=g)
    results = {}
    for path in ("reference", "triton"):
        monkeypatch.setenv(kernels.KERNELS_ENV, path)
        results[path] = run_gptq(weight, gram, 3, 24, symmetric=False, act_order=True, block_size=32)
    for field in ("ints", "scales", "zeros", "g_idx", "dequantized"):
        assert torch.equal(getattr(results["triton"], field), getattr(results["reference"], field)), field


def test_a_layers_kernel_does_not_reach_gptq(monkeypatch):
    """The pipeline builds its layers with kernel="reference" (the matmul that propagates the calibration
    streams); GPTQ's column loop still takes the path COMPRESS_KERNELS says, with the same bits."""
    import kernels.gptq_triton
    from calibration import Statistics
    from compress import GPTQ
    from compress.stages import compress_linear

    triton_block, calls = kernels.gptq_triton.gptq_block_triton, []

    def spy(*args):
        calls.append(args[0].shape)
        return triton_block(*args)

    monkeypatch.setattr(kernels.gptq_triton, "gptq_block_triton", spy)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 48, generator=g, dtype=torch.float64)
    linear = torch.nn.Linear(48, 16, bias=False)
    config = GPTQ(bits=3, group_size=16, act_order=True)
    layers = {}
    for path in ("reference", "triton"):
        monkeypatch.setenv(kernels.KERNELS_ENV, path)
        layers[path], _ = compress_linear("layer", linear, Statistics(x.T @ x), None, None, config, None,
                                          kernel="reference")
        assert layers[path].kernel == "reference"
        assert bool(calls) == (path == "triton")
    assert torch.equal(layers["triton"].base.operand().ints(), layers["reference"].base.operand().ints())
    assert torch.equal(layers["triton"].weight_approx(), layers["reference"].weight_approx())
