"""Properties of the bundled demo model, and claims that need trained weights."""
import json

import pytest
import torch

from calibration import block_linears, capture_block_inputs, find_blocks, load_text, record_grams, sample_windows
from calibration import Statistics
from compress import SVD, SVDLLM, Recipe, compress_model
from compress.allocate import rank_for_budget
from compress.factorize.svd import truncated_lowrank
from compress.factorize.svd_llm import factorize_svd_llm
from compress.linalg import output_error
from compress.models import DEMO_DIR, load_model
from compress.pipeline import DEFAULT_CALIBRATION
from compress.recipe import Calibration
from evaluations.perplexity import perplexity, text_perplexity

pytestmark = pytest.mark.slow  # trained-model runs: minutes on 2 cores


@pytest.fixture(scope="module")
def demo():
    model, tokenizer, _ = load_model("demo")
    return model, tokenizer


def test_demo_is_a_small_llama3_shaped_model(demo):
    model, _ = demo
    config = model.config
    assert config.model_type == "llama" and 4 <= config.num_hidden_layers <= 8 and 256 <= config.hidden_size <= 512
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.hidden_act == "silu"  # SwiGLU MLP
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 25 * 2**20
    assert json.loads((DEMO_DIR / "config.json").read_text())["dtype"] == "float16"
    assert str(config.dtype).endswith("float16")  # kept, so that outputs store untouched tensors in fp16


def test_recorded_heldout_perplexity_reproduces(demo):
    model, tokenizer = demo
    record = json.loads((DEMO_DIR / "training.json").read_text())
    measured = text_perplexity(model, tokenizer, "demo", seqlen=record["seqlen"], progress=False)["perplexity"]
    assert measured == pytest.approx(record["heldout_perplexity"], rel=1e-3)
    assert measured < 30  # trained: far below the vocabulary size


def test_whitened_svd_beats_plain_svd_on_real_activations(demo):
    model, tokenizer = demo
    ids = sample_windows(tokenizer, load_text(DEFAULT_CALIBRATION), 8, 128, seed=0)
    _, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, blocks[0], ids)
    linears = block_linears(blocks[1])
    with record_grams(linears) as grams:
        blocks[1](hidden, **kwargs)  # block 1 fed its (uncompressed) block-0 input is enough for the layer objective
    for name, linear in linears.items():
        weight, gram = linear.weight.detach().float(), grams[name].gram
        rank = rank_for_budget(*weight.shape, 0.5)
        whitened_lowrank = factorize_svd_llm(weight, Statistics(gram), rank, SVDLLM()).lowrank
        whitened = output_error(weight, whitened_lowrank.weight(), gram)
        plain = output_error(weight, truncated_lowrank(weight, rank).weight(), gram)
        assert whitened < plain, name


def test_svd_llm_beats_svd_in_perplexity(demo):
    _, tokenizer = demo
    ids = torch.tensor(tokenizer((DEMO_DIR / "heldout.txt").read_text()[:60000], verbose=False)["input_ids"])
    results = {}
    for method, config in (("svd", SVD(0.5)), ("svd-llm", SVDLLM(rank_budget=0.5))):
        model, _, _ = load_model("demo")
        recipe = Recipe(factorize=config, calibration=Calibration(nsamples=16))
        compressed = compress_model(model, recipe, tokenizer=tokenizer, progress=False)
        results[method] = perplexity(compressed.model, ids, 256, progress=False)
    assert results["svd-llm"] < results["svd"], results
