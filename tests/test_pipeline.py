import pytest
import torch

import compress.pipeline as pipeline
from compress import (CBQ, GPTQ, LRQ, METHODS, RTN, SAES, SVD, SVDLLM, CompressedLinear, EoRA, LoRAP, LoRC, Recipe,
                      compress_model, load_compressed, save_compressed)
from compress.architectures import LLAMA
from compress.models import load_model
from compress.recipe import Calibration

CALIB = Calibration(nsamples=4, seqlen=32)


def run(model_dir, **stages):
    return compress_model(str(model_dir), Recipe(calibration=CALIB, **stages), progress=False)


def compressed_with_grams(model_dir, monkeypatch, recipe, ids):
    """compress_model's result and the Gram each linear was compressed with."""
    grams = {}
    original = pipeline.compress_linear

    def spy(name, linear, statistics, *args, **kwargs):
        grams[name] = statistics.gram.clone()
        return original(name, linear, statistics, *args, **kwargs)

    monkeypatch.setattr(pipeline, "compress_linear", spy)
    return compress_model(str(model_dir), recipe, calib=ids, progress=False), grams


def input_grams(model, ids):
    """{name: Gram of its inputs} of every linear of the decoder blocks, recomputed through the model as it is."""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear) and ".layers." in name:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name, []).append(args[0])))
    with torch.no_grad():
        for sample in ids:
            model(input_ids=sample[None], use_cache=False)
    for handle in handles:
        handle.remove()
    grams = {}
    for name, tensors in inputs.items():
        x = torch.cat(tensors).reshape(-1, tensors[0].shape[-1]).double()
        grams[name] = x.T @ x
    return grams


def close(gram, expected):
    return torch.allclose(gram, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_blocks_see_the_outputs_of_compressed_blocks(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 4000, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(factorize=SVDLLM(rank_budget=0.3), true_sequential=False)
    result, grams = compressed_with_grams(tiny_model_dir, monkeypatch, recipe, ids)
    model = result.model
    # Block 1's attention input, recomputed through the compressed block 0:
    norm_out = {}
    handle = model.model.layers[1].input_layernorm.register_forward_hook(
        lambda m, a, out: norm_out.setdefault("x", []).append(out))
    with torch.no_grad():
        for sample in ids:
            model(input_ids=sample[None], use_cache=False)
    handle.remove()
    x = torch.cat(norm_out["x"]).reshape(-1, 64).double()
    assert torch.allclose(grams["model.layers.1.self_attn.q_proj"], x.T @ x, rtol=1e-6, atol=1e-6)
    # and the full-precision stream is kept beside it: the compressed blocks drift from it
    assert all(error > 0 for error in result.report["block_output_error"])
    # without true-sequential, a block's later groups were captured with its earlier groups uncompressed
    final = input_grams(model, ids)
    assert not close(grams["model.layers.1.self_attn.o_proj"], final["model.layers.1.self_attn.o_proj"])


def test_true_sequential_captures_each_group_after_the_earlier_ones_are_compressed(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 4000, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(factorize=SVDLLM(rank_budget=0.3))
    assert recipe.true_sequential
    result, grams = compressed_with_grams(tiny_model_dir, monkeypatch, recipe, ids)
    # every linear was compressed with the statistics of the inputs it sees in the compressed model
    final = input_grams(result.model, ids)
    assert sorted(final) == sorted(grams) and len(grams) == 14
    for name, gram in grams.items():
        assert close(gram, final[name]), name
    # linears of one data-flow group read the same input
    for block in range(2):
        for group in LLAMA.groups:
            names = [f"model.layers.{block}.{local}" for local in group]
            assert all(torch.equal(grams[name], grams[names[0]]) for name in names)


@pytest.mark.parametrize("stages, kinds", [
    (dict(factorize=SVDLLM(rank_budget=0.5)), ("dense-factors",)),
    (dict(quantize=RTN(bits=4, group_size=32)), ("quantized-base",)),
    (dict(factorize=SVD(0.5), quantize=RTN(bits=4, group_size=32)), ("quantized-factors",)),
])
def test_either_flag_alone_or_both(tiny_model_dir, stages, kinds):
    result = run(tiny_model_dir, **stages)
    layers = [m for m in result.model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14  # 7 linears x 2 blocks; lm_head stays
    assert isinstance(result.model.lm_head, torch.nn.Linear)
    assert all(layer.kernel == "auto" for layer in layers)  # served by the kernels that suit the device
    layer = layers[0]
    if kinds == ("dense-factors",):
        assert layer.base is None and layer.up.spec()["kind"] == "dense"
        assert 7 < result.report["bits_per_weight"] <= 8  # 16-bit factors at half the parameters
    elif kinds == ("quantized-base",):
        assert layer.up is None and layer.base.spec()["kind"] == "quantized"
        assert 4.5 < result.report["bits_per_weight"] < 5  # 4 + fp16 scale and padded zeros per 32 weights
    else:
        assert layer.base is None
        assert layer.up.spec()["kind"] == "quantized" and layer.down.spec()["kind"] == "quantized"
        assert 2 < result.report["bits_per_weight"] < 3.5  # ranks of 16-35 make the factors' groups small
    stored = sum(m.stored_bits() for m in layers)
    assert result.report["bits_per_weight"] == stored / result.report["compressed_parameters"]
    assert all(entry["relative_error"] > 0 for entry in result.report["layers"].values())


def test_save_load_gives_identical_outputs_and_generates(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, factorize=SVDLLM(rank_budget=0.5), quantize=RTN(bits=3, group_size=32))
    out = save_compressed(result, tmp_path / "out")
    loaded = load_compressed(out)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    generated = loaded.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 21)
    assert Recipe.load(out / "recipe.yaml") == result.recipe
    assert not list(tmp_path.glob(".*partial*"))


def test_same_seed_same_files(tiny_model_dir, tmp_path):
    paths = []
    for name in ("a", "b"):
        result = run(tiny_model_dir, factorize=SVDLLM(rank_budget=0.4), quantize=RTN(bits=4, group_size=32))
        paths.append(save_compressed(result, tmp_path / name))
    for file in ("model.safetensors", "compression_config.json"):
        assert (paths[0] / file).read_bytes() == (paths[1] / file).read_bytes()


def test_include_exclude_select_layers(tiny_model_dir):
    recipe = Recipe(quantize=RTN(bits=8, group_size=32), calibration=CALIB, include=(r"mlp\.",),
                    exclude=(r"down_proj",))
    result = compress_model(str(tiny_model_dir), recipe, progress=False)
    assert sorted({name.rsplit(".", 1)[-1] for name in result.report["layers"]}) == ["gate_proj", "up_proj"]


def test_group_size_fallback_is_reported(tiny_model_dir):
    result = run(tiny_model_dir, quantize=RTN(bits=4, group_size=64))  # 160-wide down_proj: 64 -> 40
    assert any("down_proj.base: group size 64 does not divide 160, used 40" in note
               for note in result.report["notes"])
    assert result.report["layers"]["model.layers.0.mlp.down_proj"]["group_size"] == {"base": 40}


def test_python_api_takes_a_model_object_and_token_ids(tiny_model_dir):
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 1000, (3, 16))
    result = compress_model(model, Recipe(factorize=SVD(0.5)), calib=ids, progress=False)
    assert result.model is model and result.report["calibration"]["tokens"] == 48


@pytest.mark.parametrize("method, allocate", [("saes-svd", "uniform"), ("eora", "uniform"), ("svd-llm", "welore"),
                                              ("svd", "welore")])
def test_every_factorization_and_allocator_meets_the_budget(tiny_model_dir, method, allocate):
    config, _ = METHODS["factorize"][method]
    result = run(tiny_model_dir, factorize=config(0.5, allocate=allocate))
    layers = result.report["layers"]
    kept = sum(e["rank"] * sum(e["shape"]) if e.get("rank") else e["shape"][0] * e["shape"][1]
               for e in layers.values())
    dense = result.report["compressed_parameters"]
    assert kept <= 0.5 * dense
    widest = max(sum(e["shape"]) for e in layers.values())
    assert 0.5 * dense - kept <= (widest if allocate == "welore" else sum(sum(e["shape"]) for e in layers.values()))
    assert all(e.get("rank") is None or 1 <= e["rank"] <= min(e["shape"]) for e in layers.values())
    if method == "saes-svd":
        assert all(0.25 <= e["beta"] <= 0.75 for e in layers.values())


def test_saes_with_zero_beta_is_svd_llm(tiny_model_dir, tmp_path):
    ids = torch.randint(0, 4000, (4, 32), generator=torch.Generator().manual_seed(0))
    outputs = []
    for stage in (SAES(0.4, beta=0.0), SVDLLM(rank_budget=0.4)):
        result = compress_model(str(tiny_model_dir), Recipe(factorize=stage), calib=ids, progress=False)
        with torch.no_grad():
            outputs.append(result.model(ids[:1]).logits)
        # the dense factors in memory are the ones written, down to their layout: the same outputs after loading
        loaded = load_compressed(save_compressed(result, tmp_path / type(stage).__name__))
        with torch.no_grad():
            assert torch.equal(loaded(ids[:1]).logits, outputs[-1])
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_lorap_prunes_the_mlp_and_the_result_loads_and_generates(tiny_model_dir, tmp_path):
    result = run(tiny_model_dir, factorize=LoRAP(0.6), quantize=RTN(bits=8, group_size=32))
    kept = int(160 * 0.6) // 32 * 32  # 96 channels, a multiple of 32
    assert result.model.config.intermediate_size == kept
    assert result.report["layers"]["model.layers.0.mlp.down_proj"]["channels_kept"] == kept
    assert result.model.model.layers[1].mlp.down_proj.in_features == kept
    out = save_compressed(result, tmp_path / "lorap")
    loaded = load_compressed(out)
    assert loaded.config.intermediate_size == kept
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)


@pytest.mark.parametrize("method", ["svd-llm", "saes-svd", "eora", "lorap"])
def test_duplicate_calibration_samples_give_a_singular_gram_that_is_damped(tiny_model_dir, method):
    # 16 tokens < 64 channels
    ids = torch.randint(0, 4000, (1, 16), generator=torch.Generator().manual_seed(1)).repeat(3, 1)
    config, _ = METHODS["factorize"][method]
    stage = config(0.5)
    assert stage.allocate == ("lorap" if method == "lorap" else "uniform")
    result = compress_model(str(tiny_model_dir), Recipe(factorize=stage), calib=ids, progress=False)
    with torch.no_grad():
        assert torch.isfinite(result.model(ids[:1]).logits).all()
    assert all(torch.isfinite(torch.tensor(e["relative_error"])) for e in result.report["layers"].values())
    if method in ("svd-llm", "saes-svd"):
        assert any(e["damp"] > 0 for e in result.report["layers"].values())


def test_gptq_beats_rtn_on_the_layer_objective_and_act_order_round_trips(tiny_model_dir, tmp_path):
    ids = torch.randint(0, 4000, (8, 32), generator=torch.Generator().manual_seed(2))
    errors = {}
    for name, stage in (("rtn", RTN(bits=3, group_size=32)), ("gptq", GPTQ(bits=3, group_size=32)),
                        ("gptq-act", GPTQ(bits=3, group_size=32, act_order=True))):
        result = compress_model(str(tiny_model_dir), Recipe(quantize=stage), calib=ids, progress=False)
        errors[name] = sum(e["relative_error"] for e in result.report["layers"].values())
    assert errors["gptq"] < errors["rtn"] and errors["gptq-act"] < errors["rtn"], errors
    # act-order with dynamic groups stores each column's group (g_idx); it survives save and load
    assert result.model.model.layers[0].mlp.down_proj.base.g_idx is not None
    loaded = load_compressed(save_compressed(result, tmp_path / "act"))
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, result.model(ids[:1]).logits)


def test_gptq_quantizes_factors_against_their_own_inputs(tiny_model_dir):
    ids = torch.randint(0, 4000, (8, 32), generator=torch.Generator().manual_seed(3))
    errors = {}
    for method, quantizer in (("rtn", RTN), ("gptq", GPTQ)):
        recipe = Recipe(factorize=SVDLLM(rank_budget=0.5), quantize=quantizer(bits=3, group_size=16))
        result = compress_model(str(tiny_model_dir), recipe, calib=ids, progress=False)
        errors[method] = sum(e["relative_error"] for e in result.report["layers"].values())
    assert errors["gptq"] < errors["rtn"], errors


@pytest.mark.parametrize("factor_bits", [None, 8])
def test_compensation_reduces_the_quantization_error_and_eora_beats_lorc(tiny_model_dir, factor_bits):
    ids = torch.randint(0, 4000, (8, 32), generator=torch.Generator().manual_seed(4))
    errors = {}
    for method, compensator in ((None, None), ("lorc", LoRC), ("eora", EoRA)):
        compensate = compensator(rank=8, factor_bits=factor_bits) if compensator else None
        recipe = Recipe(quantize=RTN(bits=3, group_size=32), compensate=compensate)
        result = compress_model(str(tiny_model_dir), recipe, calib=ids, progress=False)
        errors[method] = sum(e["relative_error"] for e in result.report["layers"].values())
    layer = result.model.model.layers[0].self_attn.q_proj
    assert layer.base is not None and layer.rank == 8
    assert errors["eora"] < errors["lorc"] < errors[None], errors


def test_learned_quantizers_run_in_the_pipeline_and_beat_rtn_on_the_model_output(tiny_model_dir):
    ids = torch.randint(0, 4000, (8, 32), generator=torch.Generator().manual_seed(5))
    errors = {}
    for method, quantizer in (("rtn", RTN(bits=3, group_size=32)), ("lrq", LRQ(bits=3, group_size=32, iterations=60)),
                              ("cbq", CBQ(bits=3, group_size=32, iterations=60))):
        recipe = Recipe(quantize=quantizer)
        result = compress_model(str(tiny_model_dir), recipe, calib=ids, progress=False)
        errors[method] = result.report["block_output_error"][-1]
        assert all(e["bits"] == 3 for e in result.report["layers"].values())
    assert errors["lrq"] < errors["rtn"] and errors["cbq"] < errors["rtn"], errors
