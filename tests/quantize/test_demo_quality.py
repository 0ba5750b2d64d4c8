"""Quantization and compensation claims on real activations and the trained demo model."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from calibration import block_linears, capture_block_inputs, find_blocks, load_text, record_grams, sample_windows
from calibration import Statistics
from compress import GPTQ, EoRA, LoRC, Recipe, compress_model
from compress.formats import read_quantized
from compress.formats.gptq import gptq_tensors
from compress.cli import main
from compress.models import DEMO_DIR, load_model
from compress.pipeline import DEFAULT_CALIBRATION
from compress.quantize.gptq import quantize_gptq
from compress.quantize.rtn import round_to_nearest
from compress.stages import compensation
from compress.recipe import Calibration
from evaluations.perplexity import perplexity

pytestmark = pytest.mark.slow  # trained-model runs: minutes on 2 cores


def weighted_error(weight, approx, gram):
    error = (weight - approx).double()
    return torch.einsum("oi,ij,oj->", error, gram, error).sqrt().item()


@pytest.fixture(scope="module")
def real_layers():
    """(weight, gram) of every linear of demo block 2, from real calibration activations."""
    model, tokenizer, _ = load_model("demo")
    ids = sample_windows(tokenizer, load_text(DEFAULT_CALIBRATION), 16, 128, seed=0)
    _, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks[0], ids)
    for block in blocks[:2]:
        hidden = block(hidden, **kwargs)
    linears = block_linears(blocks[2])
    with record_grams(linears) as grams:
        blocks[2](hidden, **kwargs)
    return {name: (linear.weight.detach().float(), grams[name].gram) for name, linear in linears.items()}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_real_activations(real_layers, bits):
    for name, (weight, gram) in real_layers.items():
        rtn = round_to_nearest(weight, bits, 128, symmetric=False).dequantize()
        config = GPTQ(bits=bits, group_size=128, symmetric=False, act_order=True, static_groups=True)
        gptq = quantize_gptq(weight, gram, config).weight
        assert weighted_error(weight, gptq.dequantize(), gram) < weighted_error(weight, rtn, gram), name


def test_full_rank_lorc_recovers_the_error_and_eora_beats_lorc(real_layers):
    for name, (weight, gram) in real_layers.items():
        approx = round_to_nearest(weight, 3, 128, symmetric=False).dequantize()
        up, down = compensation(weight, approx, Statistics(gram), LoRC(rank=min(weight.shape), factor_bits=None),
                                 None)
        assert torch.allclose(approx + up.float() @ down.float(), weight, atol=1e-5 * weight.abs().max().item())
        errors = {}
        for method, config in (("lorc", LoRC(rank=16, factor_bits=None)), ("eora", EoRA(rank=16, factor_bits=None))):
            up, down = compensation(weight, approx, Statistics(gram), config, None)
            errors[method] = weighted_error(weight, approx + up.float() @ down.float(), gram)
        assert errors["eora"] < errors["lorc"] < weighted_error(weight, approx, gram), name


def test_compensate_lowers_demo_perplexity_on_a_gptq_checkpoint(tmp_path):
    model, tokenizer, _ = load_model("demo")
    recipe = Recipe(quantize=GPTQ(bits=3, group_size=128), calibration=Calibration(nsamples=32))
    result = compress_model(model, recipe, tokenizer=tokenizer, progress=False)
    original = load_model("demo")[0]
    tensors = {k: v.half() for k, v in original.state_dict().items()
               if not k.endswith("_proj.weight") or ".layers." not in k}
    for name in result.report["layers"]:
        tensors.update(gptq_tensors(name, model.get_submodule(name).base.operand()))
    checkpoint = tmp_path / "gptq"
    checkpoint.mkdir()
    save_file(tensors, checkpoint / "model.safetensors")
    config = json.loads((DEMO_DIR / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 3, "group_size": 128, "sym": False,
                                     "desc_act": False, "checkpoint_format": "gptq"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "eora"
    assert main(["compensate", "--model", str(checkpoint), "--original", "demo", "--rank", "32", "--nsamples", "32",
                 "--out", str(out)]) == 0
    assert all((out / f.name).read_bytes() == f.read_bytes() for f in checkpoint.iterdir())

    ids = torch.tensor(tokenizer((DEMO_DIR / "heldout.txt").read_text()[:60000], verbose=False)["input_ids"])
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    quantized = load_model("demo")[0]
    weights = read_quantized(checkpoint).weights
    with torch.no_grad():
        for name, w_hat in weights.items():
            quantized.get_submodule(name).weight.copy_(w_hat)
        before = perplexity(quantized, ids, 256, progress=False)
        for name in weights:
            a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"].float() for x in "AB")
            quantized.get_submodule(name).weight.add_(b @ a)
        after = perplexity(quantized, ids, 256, progress=False)
    assert after < before, (before, after)
