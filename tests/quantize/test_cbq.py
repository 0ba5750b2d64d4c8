import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from calibration import block_linears, capture_block_inputs, run_block, sample_windows
from compress import CBQ, CompressError
from compress.models import DEMO_DIR, load_model
from compress.quantize.cbq import (
    TEMPERATURE_END,
    LoRARounding,
    cfp_activation_scales,
    cfp_clip,
    cfp_weight_threshold,
    fold_scales_into_norm,
    hardened_weight,
    learn_window_cbq,
    quantize_window_cbq,
    run_window,
    schedule,
    windows,
)
from compress.quantize.rtn import round_to_nearest
from kernels.grid import find_params, quantize_ints


@dataclass
class Window:
    model: nn.Module
    blocks: list[nn.Module]
    linears: list[dict[str, nn.Linear]]
    inputs: torch.Tensor  # (8, 32, 64) inputs of block 0
    targets: torch.Tensor  # (8, 32, 64) full-precision outputs of block 1
    kwargs: dict


@pytest.fixture(scope="module")
def window(one_thread) -> Window:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=128)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    blocks = list(model.model.layers)
    return make_window(model, blocks, ids)


def make_window(model: nn.Module, blocks: list[nn.Module], ids: torch.Tensor) -> Window:
    """The window of `blocks`: their compressed-stream inputs on `ids`, the outputs of the last block as targets."""
    inputs, kwargs = capture_block_inputs(model, blocks[0], ids)
    targets = inputs
    for block in blocks:
        targets = run_block(block, targets, kwargs)
    linears = [{f"model.layers.{i}.{name}": layer for name, layer in block_linears(block).items()}
               for i, block in enumerate(blocks)]
    return Window(model, blocks, linears, inputs, targets, kwargs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.fixture(scope="module")
def learnt(window):
    """3-bit, group 32, asymmetric roundings of both blocks, and the parameters before the call."""
    before = snapshot(window.model)
    roundings = learn_window_cbq(window.blocks, window.linears, window.inputs, window.targets, window.kwargs,
                                 CBQ(bits=3, group_size=32))
    return before, roundings


def window_error(window: Window, weights: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        out = run_window(window.blocks, window.linears, weights, window.inputs, window.kwargs)
    return ((out - window.targets).norm() / window.targets.norm()).item()


def expand(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    return per_group.float().repeat_interleave(group_size, dim=1)


# --- (1) LoRA-Rounding stays within one step ----------------------------------------------------------------

def test_rounding_stays_within_one_step_and_hardens_to_0_or_1(learnt):
    _, roundings = learnt
    for rounding in (r for named in roundings for r in named.values()):
        maxq = 2**rounding.bits - 1
        gs = rounding.group_size
        weight = rounding.weight  # CFP-clipped
        for scales, approx in ((rounding.final_scales(), rounding.hardened_weight()),
                               (rounding.scales().detach(), rounding.soft_weight().detach()),
                               (rounding.scales().detach(), rounding.soft_weight(TEMPERATURE_END).detach())):
            s, z = expand(scales, gs), expand(rounding.zeros, gs)
            # The learnt step may shrink the grid's range (learnt clipping): compare with the weight clipped to it.
            in_range = torch.minimum(torch.maximum(weight, -s * z), s * (maxq - z))
            assert ((approx - in_range).abs() <= s * (1 + 1e-6)).all()
        # Hardened offsets are 0 or 1 wherever the grid does not clamp.
        s, z = expand(rounding.final_scales(), gs), expand(rounding.zeros, gs)
        ints = rounding.harden().ints().float()
        base = torch.floor(weight / s) + z
        inside = (base >= 0) & (base <= maxq - 1)
        offset = (ints - base)[inside]
        assert ((offset == 0) | (offset == 1)).all() and inside.float().mean() > 0.9
        assert ((ints == 0) | (ints == maxq))[~inside].all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_initial_rounding_is_adaround_init_and_hardens_to_round_to_nearest(symmetric):
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    rounding = LoRARounding(weight, bits=3, group_size=32, symmetric=symmetric, rank=5)
    clipped = cfp_clip(weight)
    scales, zeros = find_params(clipped, 3, 32, symmetric)
    assert torch.equal(rounding.final_scales(), scales)
    # h = frac(W / s): the soft weight is the clipped weight (inside the grid's range).
    s, z = expand(scales, 32), expand(zeros, 32)
    inside = (clipped >= -s * z) & (clipped <= s * (7 - z))
    assert torch.allclose(rounding.soft_weight().detach()[inside], clipped[inside], atol=1e-5)
    assert torch.equal(rounding.harden().ints(), quantize_ints(clipped, scales, zeros, 3))


# --- (2) CBQ beats RTN on the window ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_window(one_thread) -> Window:
    """Blocks 0-1 of the trained demo model on 4 windows of 64 tokens of its calibration text: quality claims need
    weights with structure, which random ones lack."""
    model, tokenizer, _ = load_model("demo")
    text = (DEMO_DIR / "calibration.txt").read_text()
    ids = sample_windows(tokenizer, text, nsamples=4, seqlen=64, seed=0)
    blocks = list(model.model.layers[:2])
    return make_window(model, blocks, ids)


def cbq_and_rtn_errors(window: Window, config: CBQ):
    """(window error of CBQ, of RTN on the same grid, CBQ's packed weights); checks the model is left alone."""
    before = snapshot(window.model)
    packed = quantize_window_cbq(window.blocks, window.linears, window.inputs, window.targets, window.kwargs, config)
    assert unchanged(window.model, before)
    cbq = window_error(window, [{name: q.dequantize() for name, q in named.items()} for named in packed])
    rtn = window_error(window, [{name: round_to_nearest(layer.weight.detach().float(), config.bits, config.group_size,
                                                        False).dequantize()
                                 for name, layer in named.items()} for named in window.linears])
    return cbq, rtn, packed


def test_cbq_packs_what_it_learnt_and_leaves_the_blocks_alone(window, learnt):
    _, _, packed = cbq_and_rtn_errors(window, CBQ(bits=3, group_size=32))
    # same config and seed as the `learnt` fixture: the same weights
    _, roundings = learnt
    for named, quantized in zip(roundings, packed):
        for name, rounding in named.items():
            assert torch.equal(rounding.harden().qweight, quantized[name].qweight)


@pytest.mark.parametrize("bits", [3, 2])
def test_cbq_window_error_is_below_rtn(demo_window, bits):
    cbq, rtn, _ = cbq_and_rtn_errors(demo_window, CBQ(bits=bits, group_size=32))
    print(f"demo blocks 0-1, {bits}-bit g32 window error: CBQ {cbq:.4f}, RTN {rtn:.4f}, ratio {cbq / rtn:.3f}")
    assert cbq < rtn


# --- (3) CFP ------------------------------------------------------------------------------------------------

def test_cfp_detects_planted_weight_outliers():
    g = torch.Generator().manual_seed(0)
    weight = 0.02 * torch.randn(64, 128, generator=g)
    planted = torch.zeros_like(weight, dtype=torch.bool)
    rows, cols = torch.tensor([1, 7, 20, 33, 60]), torch.tensor([5, 100, 64, 2, 127])
    planted[rows, cols] = True
    weight[rows, cols] = torch.tensor([0.5, -0.6, 0.55, -0.45, 0.7])
    threshold = cfp_weight_threshold(weight)
    bulk = weight[~planted].abs()
    assert bulk.quantile(0.99) < threshold < 0.45
    assert threshold == pytest.approx(bulk.max().item())  # the largest non-outlier magnitude
    assert torch.equal(cfp_clip(weight) != weight, planted)


def test_cfp_leaves_a_weight_without_candidates_alone():
    weight = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # |w| uniform: no tail
    assert cfp_weight_threshold(weight) == pytest.approx(weight.abs().max().item())
    assert torch.equal(cfp_clip(weight), weight)


def test_cfp_activation_scales_only_the_outlier_channels():
    absmax = 0.5 + torch.rand(64, generator=torch.Generator().manual_seed(0))
    absmax[[3, 17]] = torch.tensor([40.0, 60.0])
    scales = cfp_activation_scales(absmax)
    outliers = torch.zeros(64, dtype=torch.bool)
    outliers[[3, 17]] = True
    assert (scales[outliers] > 1).all() and (scales[~outliers] == 1).all()
    scaled = absmax / scales
    assert torch.allclose(scaled[outliers], absmax[~outliers].max().expand(2))
    assert scaled.max() <= absmax[~outliers].max() * (1 + 1e-6)


def test_folding_activation_scales_into_the_norms_is_exact(window):
    block = copy.deepcopy(window.blocks[0])
    with torch.no_grad():  # make outlier channels, as in real models
        block.input_layernorm.weight[[5, 9]] *= 30
        block.post_attention_layernorm.weight[7] *= 30
    absmax = {}

    def record(name):
        def hook(_module, args):
            absmax[name] = args[0].abs().amax(dim=(0, 1))
        return hook

    attn, mlp = block.self_attn, block.mlp
    handles = [attn.q_proj.register_forward_pre_hook(record("attn")),
               mlp.gate_proj.register_forward_pre_hook(record("mlp"))]
    reference = run_block(block, window.inputs, window.kwargs)
    for handle in handles:
        handle.remove()
    attn_scales, mlp_scales = cfp_activation_scales(absmax["attn"]), cfp_activation_scales(absmax["mlp"])
    assert (attn_scales[[5, 9]] > 1).all() and mlp_scales[7] > 1
    fold_scales_into_norm(block.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], attn_scales)
    fold_scales_into_norm(block.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], mlp_scales)
    assert torch.allclose(run_block(block, window.inputs, window.kwargs), reference, rtol=1e-5, atol=1e-5)


# --- (4) the packed weights are what the hardened forward used ----------------------------------------------

def test_packed_ints_are_on_the_grid_and_are_the_hardened_weights(window, learnt):
    _, roundings = learnt
    hardened = []
    for named in roundings:
        hardened.append({})
        for name, rounding in named.items():
            quantized = rounding.harden()
            ints = quantized.ints()
            assert ints.min() >= 0 and ints.max() <= 2**quantized.bits - 1
            assert quantized.bits == 3 and quantized.group_size == 32 and not quantized.symmetric
            assert torch.equal(quantized.scales.float(), rounding.final_scales())
            assert torch.equal(quantized.zeros(), rounding.zeros)
            pure = hardened_weight(rounding.weight, rounding.final_scales(), rounding.zeros, rounding.final_v(), 3)
            assert torch.equal(quantized.dequantize(), pure)
            assert torch.equal(rounding.hardened_weight(), pure)
            hardened[-1][name] = pure
    # The forward through the window with the pure hardened weights is the forward of blocks holding the packed
    # ones.
    copies = []
    for block, named, of_block in zip(window.blocks, window.linears, roundings):
        local = {id(module): name for name, module in block.named_modules()}
        copies.append(copy.deepcopy(block))
        for name, layer in named.items():
            copies[-1].get_submodule(local[id(layer)]).weight.data = of_block[name].harden().dequantize()
    expected = window.inputs
    for block in copies:
        expected = run_block(block, expected, window.kwargs)
    with torch.no_grad():
        assert torch.equal(run_window(window.blocks, window.linears, hardened, window.inputs, window.kwargs), expected)


@pytest.mark.parametrize("bits", [2, 4])
def test_symmetric_grid_packs_the_hardened_weights(window, bits):
    targets = run_block(window.blocks[0], window.inputs, window.kwargs)
    config = CBQ(bits=bits, group_size=32, symmetric=True, iterations=20)
    roundings = learn_window_cbq(window.blocks[:1], window.linears[:1], window.inputs, targets, window.kwargs, config)
    for rounding in roundings[0].values():
        quantized = rounding.harden()
        assert quantized.symmetric and quantized.ints().max() <= 2**bits - 1
        assert torch.equal(quantized.dequantize(), rounding.hardened_weight())


# --- (5) the blocks are left as they were -------------------------------------------------------------------

def test_blocks_are_unchanged_after_learning(window, learnt):
    before, _ = learnt
    assert unchanged(window.model, before)
    assert all(p.grad is None for p in window.model.parameters())


# --- schedule, windows, config ------------------------------------------------------------------------------

def test_schedule_warms_up_then_anneals_beta_and_temperature():
    assert schedule(0, 100) == (None, 1.0) and schedule(19, 100) == (None, 1.0)
    assert schedule(20, 100) == (20.0, 1.0)
    beta, temperature = schedule(99, 100)
    assert beta == pytest.approx(2.0) and temperature == pytest.approx(TEMPERATURE_END)


def test_windows_slide_with_overlap_and_cover_every_block():
    assert windows(2, 2, 1) == [range(0, 2)]
    assert windows(4, 2, 1) == [range(0, 2), range(1, 3), range(2, 4)]
    assert windows(5, 2, 0) == [range(0, 2), range(2, 4), range(3, 5)]
    assert windows(1, 2, 1) == [range(0, 1)]


def test_config_rejects_bad_values():
    assert CBQ() == CBQ(bits=4, group_size=128, symmetric=False, rank=5, iterations=200, lr=1e-3, batch_size=4,
                        window=2, overlap=1, reg_weight=0.01, kl_weight=1.0, seed=0)
    with pytest.raises(CompressError, match="bits"):
        CBQ(bits=5, group_size=32)
    with pytest.raises(CompressError, match="overlap"):
        CBQ(bits=4, group_size=32, window=2, overlap=2)
    for kwargs in (dict(rank=0), dict(window=0), dict(iterations=-1), dict(batch_size=0), dict(lr=0.0)):
        with pytest.raises(CompressError):
            CBQ(bits=4, group_size=32, **kwargs)
