"""--bpw: each form's bits are the bits stored, its cost is what it claims, the statistics are the model's own
gradients, the budget holds, and a replayed recipe writes the same files."""
import json

import pytest
import torch
from torch import nn

from calibration import Statistics
from compress import LRQ, Recipe, compress_model
from compress.architectures import architecture
from compress.blocks import InMemoryBlocks
from compress.errors import CompressError
from compress.quantize.gptq import GPTAQ, GPTQ
from compress.quantize.rtn import RTN
from compress.quantize.gptq import column_order, inverse_hessian_factor, quantize_gptq, working_hessian
from compress.search import (Form, eora_residuals, form_bits, form_configs, form_costs, gptq_column_weights,
                             layer_statistics, menu, residual_spectrum)
from compress.stages import compress_linear
from tests.conftest import tiny_llama


def random_gram(n: int, tokens: int = 256, seed: int = 0) -> torch.Tensor:
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3, n)
    return (x.T @ x).double()


@pytest.mark.parametrize("quantize", [RTN(), GPTQ(), GPTQ(act_order=True, static_groups=False), GPTQ(symmetric=True)],
                         ids=["rtn", "gptq", "gptq-g_idx", "gptq-sym"])
def test_form_bits_are_the_bits_the_layer_stores(quantize):
    torch.manual_seed(0)
    out, inp = 96, 160  # 160: groups of 64 and 128 fall back to 40 and 80
    linear = nn.Linear(inp, out, bias=False)
    gram = random_gram(inp)
    forms = menu((out, inp))
    assert any(form.rank and not form.factorized for form in forms) and {f.bits for f in forms} == {2, 3, 4, 8}
    assert any(form.factorized for form in forms)
    for form in forms:
        layer, _ = compress_linear("layer", linear, Statistics(gram), *form_configs(form, quantize, None))
        assert layer.stored_bits() == form_bits(form, (out, inp), quantize, None), form


def test_menu_drops_forms_that_fall_back_to_the_same_group():
    forms = menu((64, 64))  # groups of 64 and 128 are both one group per row
    assert len({(f.bits, f.group_size) for f in forms if not f.rank}) == 8
    assert all(f.rank < 32 for f in forms if not f.factorized)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_compensated_cost_is_the_best_rank_r_residual(shape):
    """The spectrum's tail past r equals the weighted output error of the best rank-r correction, found by brute
    force as the truncated SVD of F^1/2 E G^1/2 mapped back, and no other rank-r correction does better."""
    torch.manual_seed(1)
    out, inp = shape
    error = torch.randn(out, inp, dtype=torch.float64)
    gram = random_gram(inp, tokens=64)
    energy = torch.rand(out, dtype=torch.float64) + 0.1
    spectrum = residual_spectrum(error, gram, energy)
    values, vectors = torch.linalg.eigh(gram)
    root = vectors * values.sqrt() @ vectors.T
    inverse_root = vectors * values.rsqrt() @ vectors.T
    weights = energy.sqrt()[:, None]

    def cost(correction):  # sum_o f_o [(E - C) G (E - C)^T]_oo
        residual = error - correction
        return float((energy * ((residual @ gram) * residual).sum(1)).sum())

    u, s, vh = torch.linalg.svd(weights * error @ root, full_matrices=False)
    for rank in (0, 3, 8):
        best = (u[:, :rank] * s[:rank] @ vh[:rank]) @ inverse_root / weights
        assert float(spectrum[rank:].sum()) == pytest.approx(cost(best), rel=1e-4)
        other = torch.randn(out, rank, dtype=torch.float64) @ torch.randn(rank, inp, dtype=torch.float64) * 0.1
        assert cost(best) <= cost(other)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_cost_model_matches_gptqs_error(bits):
    """For GPTQ the cost of a form is a model of GPTQ's error (each group's RTN variance in GPTQ's whitened basis),
    not GPTQ itself: it must land near what GPTQ does, and far below RTN's own error on a correlated Gram."""
    torch.manual_seed(0)
    out, inp = 48, 256
    weight = torch.randn(out, inp) * torch.rand(out, 1)
    mixing = torch.randn(inp, inp) / inp**0.5 + torch.eye(inp)
    x = torch.randn(2048, inp) @ mixing * torch.linspace(0.2, 2, inp)  # correlated inputs
    gram = (x.T @ x).double()
    energy = torch.rand(out, dtype=torch.float64) + 0.5
    config = GPTQ(bits=bits, group_size=64)
    model, rtn = (form_costs(weight, gram, energy, [Form(bits, 64)], config, columns)[0]
                  for columns in (gptq_column_weights(gram, config), None))
    error = weight - quantize_gptq(weight, gram, config).weight.dequantize()
    actual = 0.5 * float((energy * ((error.double() @ gram) * error.double()).sum(1)).sum())
    assert actual / 1.2 < model < actual * 1.2
    assert rtn > 2 * actual


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_column_weights_are_gptqs_inverse_hessian_diagonal(act_order):
    """The Schur complements from one Cholesky in reversed order equal 1 / d_j^2 from GPTQ's own factor of the damped
    inverse Hessian (inverse_hessian_factor), column by column; a dead input counts as GPTQ counts it."""
    gram = random_gram(48, tokens=200)
    gram[5, :] = gram[:, 5] = 0  # a dead input
    config = GPTQ(act_order=act_order, damp=0.01)
    perm, dead = column_order(gram, act_order, "cpu")
    order = torch.arange(48) if perm is None else perm
    factor, _, _ = inverse_hessian_factor(
        lambda _: working_hessian(gram, perm, dead[order], torch.float64, "cpu", True), config.damp)
    expected = torch.empty(48, dtype=torch.float64)
    expected[order] = factor.diagonal().square().reciprocal()
    assert torch.allclose(gptq_column_weights(gram, config).double(), expected, rtol=1e-4)
    assert gptq_column_weights(gram, RTN()) is None


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_compensated_residuals_are_eoras_unweighted_truncation_weighted(shape):
    """EoRA keeps the top singular directions of the whitened error whatever the gradient weights: the residuals
    equal sum_o f_o ||row o of (A - A_r)||^2 with A_r from the SVD, for every rank."""
    torch.manual_seed(2)
    whitened = torch.randn(*shape, dtype=torch.float64) * torch.rand(shape[0], 1, dtype=torch.float64)
    energy = torch.rand(shape[0], dtype=torch.float64) + 0.1
    residuals = eora_residuals(whitened.float(), energy)
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    total = float(residuals[0])
    for rank in (0, 1, 5, min(shape)):  # float32 products: within 1e-6 of the total
        residual = whitened - u[:, :rank] * s[:rank] @ vh[:rank]
        assert float(residuals[rank]) == pytest.approx(float(energy @ residual.square().sum(1)), abs=1e-6 * total)


@pytest.mark.parametrize("shape", [(256, 384), (384, 256)])
def test_compensated_residuals_from_the_top_directions_alone_are_near_the_exact_ones(shape):
    """Below half the smaller side, the top directions come from a randomized subspace iteration: on a noise-like
    error (GPTQ's modelled error, whose flat spectrum is the hard case) its residuals lie within 0.5% of the exact
    ones at every rank up to `rank`, and are the same on every run (seeded)."""
    generator = torch.Generator().manual_seed(3)
    out, inp = shape
    variance = torch.rand(out, inp, generator=generator) * torch.rand(1, inp, generator=generator) ** 2
    whitened = (torch.rand(out, inp, generator=generator) - 0.5) * variance.sqrt()
    energy = torch.rand(out, generator=generator, dtype=torch.float64) ** 3
    exact = eora_residuals(whitened, energy)
    fast = eora_residuals(whitened, energy, rank=64)
    assert len(fast) == 65
    assert torch.allclose(fast, exact[:65], rtol=0.005)
    assert float(fast[64]) < 0.95 * float(fast[0])  # the test is not vacuous: rank 64 captures energy
    assert torch.equal(fast, eora_residuals(whitened, energy, rank=64))


def test_layer_statistics_are_the_full_models_gradients():
    """Block-by-block backward from stored block inputs gives every linear the input Gram and output-gradient energy
    that one backward through the whole model gives."""
    model = tiny_llama()
    arch = architecture(model)
    ids = torch.randint(0, 4096, (3, 16), generator=torch.Generator().manual_seed(0))
    targets = [[f"{arch.blocks}.{i}.{local}" for local in arch.linears] for i in range(2)]
    found = {name: (gram, energy) for name, _, gram, energy in
             layer_statistics(model, arch, InMemoryBlocks(), targets, ids, progress=False)}

    grams, energies = {}, {}
    handles = []
    for name in found:
        layer = model.get_submodule(name)
        handles.append(layer.register_forward_pre_hook(
            lambda _m, args, n=name: grams.__setitem__(n, grams.get(n, 0) + (lambda x: x.T @ x)(
                args[0].detach().reshape(-1, args[0].shape[-1]).double()))))
        handles.append(layer.register_full_backward_hook(
            lambda _m, _gi, go, n=name: energies.__setitem__(n, energies.get(n, 0) + go[0].detach().double()
                                                             .reshape(-1, go[0].shape[-1]).square().sum(0))))
    hidden = model.model.embed_tokens(ids).detach().requires_grad_(True)
    for window, tokens in zip(hidden, ids):
        logits = model(inputs_embeds=window[None]).logits[0]
        nn.functional.cross_entropy(logits[:-1], tokens[1:]).backward()
    for handle in handles:
        handle.remove()
    for name, (gram, energy) in found.items():
        torch.testing.assert_close(gram, grams[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(energy * ids.numel(), energies[name], rtol=1e-4, atol=1e-12)


def bpw_run(budget: float, quantize=GPTQ(), **recipe):
    model = tiny_llama()
    ids = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(quantize=quantize, bpw=budget, **recipe)
    return compress_model(model, recipe, calib=ids, progress=False)


@pytest.mark.parametrize("budget", [2.6, 3.4, 4.6])
def test_budget_holds_and_the_plan_is_what_is_stored(budget):
    result = bpw_run(budget)
    search = result.report["bpw"]
    assert result.report["bits_per_weight"] <= budget
    assert result.report["bits_per_weight"] == search["planned"]  # every form's bits counted exactly
    assert budget - result.report["bits_per_weight"] < 0.05  # a 2-block model: coarse steps
    layers = result.report["layers"]
    assert set(result.recipe.forms) == set(layers)
    for name, entry in layers.items():
        form = Form.from_dict(result.recipe.forms[name])
        assert entry["form"] == form.label and entry["bits"] == form.bits


def test_more_bits_buy_less_estimated_loss():
    low, high = (bpw_run(budget).report["bpw"]["estimated_loss_increase"] for budget in (2.6, 4.6))
    assert high < low


def test_a_replayed_recipe_gives_identical_weights():
    first = bpw_run(3.4, quantize=GPTAQ())
    model = tiny_llama()
    ids = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    again = compress_model(model, Recipe.from_dict(first.recipe.to_dict()), calib=ids, progress=False)
    assert "seconds" not in again.report["bpw"]  # replayed: no search
    ours, theirs = first.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_bad_budgets_and_recipes_are_refused():
    with pytest.raises(CompressError, match="below the smallest forms"):
        bpw_run(1.5)
    with pytest.raises(CompressError, match="layer quantizer"):
        Recipe(quantize=LRQ(), bpw=3.0)
    with pytest.raises(CompressError, match="without --rank-budget"):
        from compress import SVDLLM
        Recipe(factorize=SVDLLM(), quantize=GPTQ(), bpw=3.0)
    with pytest.raises(CompressError, match="recipe.forms: layer"):
        Recipe(quantize=GPTQ(), forms={"layer": {"bits": 3}})
    model = tiny_llama()
    recipe = Recipe(quantize=GPTQ(), bpw=3.0, forms={"model.layers.0.mlp.up_proj": {"bits": 3, "group_size": 64}})
    with pytest.raises(CompressError, match="recipe.forms does not match"):
        compress_model(model, recipe, calib=torch.zeros(2, 16, dtype=torch.long), progress=False)


def test_cli_plans_on_a_streamed_checkpoint_and_replays_to_the_same_files(capsys, tmp_path, tiny_model_dir):
    """The CLI streams a local checkpoint block by block, so the plan's passes run on the streamed source too."""
    from compress.cli import main
    from tests.test_cli import FAST, refuse

    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["--model", str(tiny_model_dir), "--bpw", "3.5", "--out", str(first)] + FAST) == 0
    assert "forms searched" in capsys.readouterr().out
    report = json.loads((first / "report.json").read_text())
    assert 3.4 < report["bits_per_weight"] <= 3.5 and (first / "forms.png").stat().st_size > 0
    assert Recipe.load(first / "recipe.yaml").quantize == GPTAQ()  # --bpw's default quantizer
    assert main(["--model", str(tiny_model_dir), "--recipe", str(first / "recipe.yaml"), "--no-eval-ppl", "--out",
                 str(again)]) == 0
    assert "forms replayed" in capsys.readouterr().out
    tensors = sorted(path.name for path in first.glob("*.safetensors"))
    assert tensors and tensors == sorted(path.name for path in again.glob("*.safetensors"))
    assert all((first / name).read_bytes() == (again / name).read_bytes() for name in tensors)
    for flags, message in [(["--bpw", "3", "--wbits", "3"], "drop --wbits"),
                           (["--bpw", "1"], "below the smallest forms"),
                           (["--bpw", "3", "--quantize", "lrq"], "needs a layer quantizer")]:
        refuse(capsys, ["--model", str(tiny_model_dir), "--out", str(tmp_path / "x")] + flags + FAST, message,
               tmp_path / "x")
