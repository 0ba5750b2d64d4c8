import pytest
import torch

from compress import CompressError, Recipe, SignRound
from compress.cli import build_recipe, compress_parser
from compress.methods import METHODS
from compress.quantize.rtn import round_to_nearest
from compress.quantize.signround import (SignRoundParams, quantize_block_signround, quantize_window_signround,
                                         train_signround_block)
from kernels.grid import find_params, quantize_ints
from tests.quantize.blocks import block_error, tiny_block_problem
from tests.quantize.blocks import demo_block_problem as demo_block_problem_

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def block_problem():
    return tiny_block_problem(16)


@pytest.fixture(scope="module")
def demo_block_problem():
    return demo_block_problem_()


@pytest.mark.parametrize("symmetric", [False, True])
def test_start_is_round_to_nearest(block_problem, symmetric):
    block, linears, inputs, targets, kwargs = block_problem
    packed = quantize_block_signround(block, linears, inputs, targets, kwargs,
                                      SignRound(bits=3, group_size=32, iterations=0, symmetric=symmetric,
                                                      clip="minmax"))
    for name, linear in linears.items():
        rtn = round_to_nearest(linear.weight.detach().float(), 3, 32, symmetric)
        assert torch.equal(packed[name].ints(), rtn.ints()) and torch.equal(packed[name].scales, rtn.scales)
        assert torch.equal(packed[name].zeros(), rtn.zeros()) and packed[name].symmetric == symmetric


@pytest.mark.parametrize("bits, group_size, symmetric", [(2, 16, False), (3, 32, True), (4, 64, False)])
def test_weight_matches_the_packed_weight_for_any_parameters(bits, group_size, symmetric):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=g)
    q = SignRoundParams(weight, bits, group_size, symmetric)
    scales, zeros = find_params(weight, bits, group_size, symmetric)
    with torch.no_grad():
        assert torch.equal(q.weight(), round_to_nearest(weight, bits, group_size, symmetric).dequantize())
        q.v.uniform_(-0.5, 0.5, generator=g)
        q.alpha.uniform_(0.5, 1, generator=g)
        if q.beta is not None:
            q.beta.uniform_(0.5, 1, generator=g)
        packed = q.fold()
        ints = packed.ints()
        assert ints.min() >= 0 and ints.max() <= 2**bits - 1
        assert torch.equal(packed.dequantize(), q.weight())
        assert not torch.equal(ints, quantize_ints(weight, scales, zeros, bits))


def test_gradients_reach_every_parameter():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    q = SignRoundParams(weight, bits=3, group_size=16, symmetric=False)
    (q.weight() * torch.randn(8, 32)).sum().backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_stored_weight_is_the_best_steps_and_never_worse_than_the_start(block_problem):
    block, linears, inputs, targets, kwargs = block_problem
    config = SignRound(bits=2, group_size=32, iterations=40, batch_size=4, clip="minmax")
    seen = []
    quantizers, trace = train_signround_block(block, linears, inputs, targets, kwargs, config,
                                              on_step=lambda step, loss, weights: seen.append(weights))
    packed = {name: q.fold() for name, q in quantizers.items()}
    assert len(trace.losses) == len(seen) == 40
    assert trace.best_step > 0, "training found nothing better than the start"
    assert trace.losses[trace.best_step] == min(trace.losses)
    for name in linears:  # exactly the weights the best step's loss was computed with
        assert torch.equal(packed[name].dequantize(), seen[trace.best_step][name])
    rtn = {name: round_to_nearest(linear.weight.detach().float(), 2, 32, False) for name, linear in linears.items()}
    final = block_error(block, linears, packed, inputs, targets, kwargs)
    start = block_error(block, linears, rtn, inputs, targets, kwargs)
    print(f"tiny block, 2 bits g32: block error SignRound / RTN = {final / start:.3f}")
    assert final < start
    assert trace.final_loss == pytest.approx(final, rel=1e-4) and trace.start_loss == pytest.approx(start, rel=1e-4)
    for q in quantizers.values():  # parameters in range, and moved
        assert q.v.abs().max() <= 0.5 and q.v.abs().max() > 0
        for p in (q.alpha, q.beta):
            assert p.min() >= 0.5 and p.max() <= 1.0
    assert any((q.alpha < 1).any() or (q.beta < 1).any() for q in quantizers.values())


@pytest.mark.parametrize("bits", [3, 2])
def test_signround_beats_rtn_on_the_demo_block(demo_block_problem, bits):
    block, linears, inputs, targets, kwargs = demo_block_problem
    config = SignRound(bits=bits, group_size=32, iterations=50, batch_size=2)
    packed = quantize_block_signround(block, linears, inputs, targets, kwargs, config)
    rtn = {name: round_to_nearest(linear.weight.detach().float(), bits, 32, False) for name, linear in linears.items()}
    error = block_error(block, linears, packed, inputs, targets, kwargs)
    rtn_error = block_error(block, linears, rtn, inputs, targets, kwargs)
    print(f"demo block 0, {bits} bits g32: block error SignRound / RTN = {error / rtn_error:.3f}")
    assert error < rtn_error


def test_never_worse_than_the_start(block_problem):
    """A mini-batch loss lower than the start's says little when the windows differ: one window with exact targets,
    the others noisy, and a learning rate far too large. The step that saw the exact window has the lowest
    mini-batch loss, its parameters are worse on all windows, and the start (round-to-nearest) is kept."""
    block, linears, inputs, targets, kwargs = block_problem
    noisy = targets + 0.01 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    noisy[3] = targets[3]
    config = SignRound(bits=3, group_size=32, iterations=8, batch_size=1, lr=1.0, clip="minmax")
    quantizers, trace = train_signround_block(block, linears, inputs, noisy, kwargs, config)
    assert min(trace.losses) < trace.losses[0] and trace.best_step == -1
    assert trace.final_loss == trace.start_loss
    for name, q in quantizers.items():
        rtn = round_to_nearest(linears[name].weight.detach().float(), 3, 32, False)
        packed = q.fold()
        assert torch.equal(packed.ints(), rtn.ints()) and torch.equal(packed.scales, rtn.scales)


def test_deterministic_and_block_unchanged(block_problem):
    block, linears, inputs, targets, kwargs = block_problem
    before = {name: p.detach().clone() for name, p in block.named_parameters()}
    config = SignRound(bits=3, group_size=32, iterations=6, batch_size=4, seed=5)
    (first,) = quantize_window_signround([block], [linears], inputs, targets, kwargs, config)
    second = quantize_block_signround(block, linears, inputs, targets, kwargs, config)
    for name in linears:
        assert torch.equal(first[name].ints(), second[name].ints())
        assert torch.equal(first[name].scales, second[name].scales)
        assert torch.equal(first[name].zeros(), second[name].zeros())
        assert first[name].scales.dtype == torch.float16 and first[name].group_size == 32
    for name, p in block.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None and p.requires_grad, name


def test_config_defaults_and_bad_values():
    config = SignRound()
    assert (config.iterations, config.lr, config.batch_size, config.seed) == (200, None, 8, 0)
    assert config.step_size == 1 / 200 and SignRound(iterations=50).step_size == 0.02
    assert SignRound(lr=0.01).step_size == 0.01 and (config.window, config.overlap) == (1, 0)
    for kwargs in (dict(iterations=-1), dict(lr=0.0), dict(lr=-1e-3), dict(batch_size=0), dict(bits=5),
                   dict(group_size=-1)):
        with pytest.raises(CompressError) as error:
            SignRound(**kwargs)
        assert "\n" not in str(error.value)


def test_recipe_and_cli_round_trip(tmp_path):
    assert METHODS["quantize"]["signround"][0] is SignRound
    args = compress_parser().parse_args(["--model", "demo", "--quantize", "signround", "--wbits", "3",
                                         "--iterations", "50"])
    recipe = build_recipe(args)
    assert recipe.quantize == SignRound(bits=3, iterations=50)
    for lr in (None, 2e-3):
        recipe = Recipe(quantize=SignRound(bits=2, group_size=64, symmetric=True, iterations=7, lr=lr, seed=4))
        for suffix, text in ((".yaml", recipe.to_yaml()), (".json", recipe.to_json())):
            path = tmp_path / f"recipe{suffix}"
            path.write_text(text)
            assert Recipe.load(path) == recipe and type(Recipe.load(path).quantize) is SignRound
    assert "method: signround" in recipe.to_yaml()


def test_started_from_gptq_it_starts_at_gptq_and_never_ends_worse(block_problem):
    """start "gptq": with no step the result is GPTQ's, bit for bit (GPTQ against the Gram of the block's own
    inputs, on the min-max grid); after training the block error is at most GPTQ's."""
    from calibration import record_grams, run_block
    from compress.quantize.gptq import GPTQ, quantize_gptq

    block, linears, inputs, targets, kwargs = block_problem
    with record_grams(linears) as grams:
        run_block(block, inputs, kwargs)
    gptq = {name: quantize_gptq(linear.weight.detach().float(), grams[name].gram,
                                GPTQ(bits=3, group_size=32, clip="minmax")).weight for name, linear in linears.items()}
    start = quantize_block_signround(block, linears, inputs, targets, kwargs,
                                     SignRound(bits=3, group_size=32, iterations=0, clip="minmax", start="gptq"))
    for name in linears:
        assert torch.equal(start[name].ints(), gptq[name].ints()) and torch.equal(start[name].scales, gptq[name].scales)
    gptq_error = block_error(block, linears, gptq, inputs, targets, kwargs)
    for iterations, batch_size, improves in ((8, 1, False), (100, 2, True)):  # too few steps: GPTQ's result is kept
        config = SignRound(bits=3, group_size=32, iterations=iterations, batch_size=batch_size, lr=1.0 / 100,
                           clip="minmax", start="gptq")
        learned = quantize_block_signround(block, linears, inputs, targets, kwargs, config)
        error = block_error(block, linears, learned, inputs, targets, kwargs)
        assert error < gptq_error if improves else error <= gptq_error
    with pytest.raises(CompressError, match="start must be one of"):
        SignRound(start="hqq")
