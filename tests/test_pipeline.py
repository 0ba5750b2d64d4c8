import math

import pytest
import torch
from transformers import AutoConfig

import compress.pipeline as pipeline
from compress import (CBQ, GPTAQ, GPTQ, LRQ, METHODS, RTN, SAES, SVD, SVDLLM, CompressedLinear, EoRA, LoRAP, LoRC,
                      Recipe, SignRound, compress_model, load_compressed, save_compressed)
from compress.architectures import LLAMA
from calibration import sample_windows
from compress.models import DEMO_DIR, load_model
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


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of every decoder-block linear of a Llama config, written out from its sizes."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    local = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
             "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
             "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{block}.{name}": shape for block in range(config.num_hidden_layers)
            for name, shape in local.items()}


def uniform_rank(out: int, inp: int, budget: float) -> int:
    """The uniform allocator's rank: the largest r with r * (out + in) <= budget * out * in, at least 1."""
    return max(1, math.floor(budget * out * inp / (out + inp)))


def packed_bits(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Stored bits of a (rows, cols) tensor on an asymmetric grid without act-order: int32 qweight
    (rows, ceil(cols/32)*bits), fp16 scales (rows, groups), int32 qzeros (groups, ceil(rows/32)*bits)."""
    if group_size <= 0 or group_size >= cols:
        group_size = cols
    else:  # the largest divisor of cols not above the requested size
        group_size = max(d for d in range(1, group_size + 1) if cols % d == 0)
    groups = cols // group_size
    return 32 * rows * math.ceil(cols / 32) * bits + 16 * rows * groups + 32 * groups * math.ceil(rows / 32) * bits


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
    shapes = linear_shapes(AutoConfig.from_pretrained(tiny_model_dir))
    assert {name: (m.out_features, m.in_features) for name, m in result.model.named_modules()
            if isinstance(m, CompressedLinear)} == shapes
    parameters = sum(out * inp for out, inp in shapes.values())
    assert result.report["compressed_parameters"] == parameters
    ranks = {name: uniform_rank(out, inp, 0.5) for name, (out, inp) in shapes.items()}
    layer = layers[0]
    if kinds == ("dense-factors",):
        assert layer.base is None and layer.up.spec()["kind"] == "dense"
        # fp16 up (out, r) and down (r, in)
        stored = sum(16 * ranks[name] * (out + inp) for name, (out, inp) in shapes.items())
    elif kinds == ("quantized-base",):
        assert layer.up is None and layer.base.spec()["kind"] == "quantized"
        stored = sum(packed_bits(out, inp, 4, 32) for out, inp in shapes.values())
    else:
        assert layer.base is None
        assert layer.up.spec()["kind"] == "quantized" and layer.down.spec()["kind"] == "quantized"
        # up (out, r) with r < 32 is one group per row; down (r, in) has groups of 32
        stored = sum(packed_bits(out, ranks[name], 4, 32) + packed_bits(ranks[name], inp, 4, 32)
                     for name, (out, inp) in shapes.items())
    assert {name: e.get("rank") for name, e in result.report["layers"].items()} == \
        {name: ranks[name] if "factorize" in stages else None for name in shapes}
    assert result.report["bits_per_weight"] == stored / parameters
    assert result.report["bits_per_weight"] == sum(m.stored_bits() for m in layers) / parameters
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
    for stage in (SAES(0.4, beta=0.0, ridge=0.0), SVDLLM(rank_budget=0.4)):
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


@pytest.fixture(scope="module")
def demo_ids():
    """4 windows of 64 tokens of the demo model's calibration text."""
    _, tokenizer, _ = load_model("demo")
    return sample_windows(tokenizer, (DEMO_DIR / "calibration.txt").read_text(), nsamples=4, seqlen=64, seed=0)


def demo_errors(ids, stages: dict, blocks: int = 2) -> dict[str, float]:
    """{name: (summed layer relative error, last block's output error)} of each recipe on the first `blocks` blocks
    of the trained demo model: quality claims need weights with structure, which random ones lack."""
    errors, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster than two loaded threads on these small matrices
    try:
        for name, stage in stages.items():
            model, _, _ = load_model("demo")
            model.model.layers = model.model.layers[:blocks]
            model.config.num_hidden_layers = blocks
            result = compress_model(model, Recipe(**stage), calib=ids, progress=False)
            errors[name] = (sum(e["relative_error"] for e in result.report["layers"].values()),
                            result.report["block_output_error"][-1])
    finally:
        torch.set_num_threads(threads)
    return errors


def test_gptq_act_order_round_trips(tiny_model_dir, tmp_path):
    ids = torch.randint(0, 4000, (8, 32), generator=torch.Generator().manual_seed(2))
    config = GPTQ(bits=3, group_size=32, act_order=True, static_groups=False)
    result = compress_model(str(tiny_model_dir), Recipe(quantize=config), calib=ids, progress=False)
    # act-order with dynamic groups stores each column's group (g_idx); it survives save and load
    assert result.model.model.layers[0].mlp.down_proj.base.g_idx is not None
    loaded = load_compressed(save_compressed(result, tmp_path / "act"))
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]).logits, result.model(ids[:1]).logits)


def test_gptq_beats_rtn_on_the_layer_objective(demo_ids):
    errors = demo_errors(demo_ids, {"rtn": dict(quantize=RTN(bits=3, group_size=32)),
                                    "gptq": dict(quantize=GPTQ(bits=3, group_size=32, act_order=False,
                                                               static_groups=False)),
                                    "gptq-act": dict(quantize=GPTQ(bits=3, group_size=32))})
    layer = {name: error for name, (error, _) in errors.items()}
    assert layer["gptq"] < layer["rtn"] and layer["gptq-act"] < layer["rtn"], errors


def test_gptq_quantizes_factors_against_their_own_inputs(demo_ids):
    errors = demo_errors(demo_ids, {method: dict(factorize=SVDLLM(rank_budget=0.5),
                                                 quantize=quantizer(bits=3, group_size=16))
                                    for method, quantizer in (("rtn", RTN), ("gptq", GPTQ))})
    assert errors["gptq"][0] < errors["rtn"][0], errors


@pytest.mark.parametrize("factor_bits", [None, 8])
def test_compensation_adds_factors_beside_the_base(tiny_model_dir, factor_bits):
    ids = torch.randint(0, 4000, (8, 32), generator=torch.Generator().manual_seed(4))
    for compensator in (LoRC, EoRA):
        recipe = Recipe(quantize=RTN(bits=3, group_size=32), compensate=compensator(rank=8, factor_bits=factor_bits))
        result = compress_model(str(tiny_model_dir), recipe, calib=ids, progress=False)
        layer = result.model.model.layers[0].self_attn.q_proj
        assert layer.base is not None and layer.rank == 8
        assert layer.up.spec()["kind"] == ("dense" if factor_bits is None else "quantized")


@pytest.mark.parametrize("factor_bits", [None, 8])
def test_compensation_reduces_the_quantization_error_and_eora_beats_lorc(demo_ids, factor_bits):
    errors = demo_errors(demo_ids, {
        method: dict(quantize=RTN(bits=3, group_size=32),
                     compensate=compensator(rank=8, factor_bits=factor_bits) if compensator else None)
        for method, compensator in ((None, None), ("lorc", LoRC), ("eora", EoRA))})
    assert errors["eora"][0] < errors["lorc"][0] < errors[None][0], errors


def test_learned_quantizers_run_in_the_pipeline(tiny_model_dir):
    ids = torch.randint(0, 4000, (8, 32), generator=torch.Generator().manual_seed(5))
    for quantizer in (LRQ(bits=3, group_size=32, iterations=5), CBQ(bits=3, group_size=32, iterations=5),
                      SignRound(bits=3, group_size=32, iterations=5)):
        result = compress_model(str(tiny_model_dir), Recipe(quantize=quantizer), calib=ids, progress=False)
        assert all(e["bits"] == 3 for e in result.report["layers"].values())
        assert len(result.report["block_output_error"]) == 2


def test_learned_quantizers_beat_rtn_on_the_model_output(demo_ids):
    errors = demo_errors(demo_ids, {"rtn": dict(quantize=RTN(bits=3, group_size=32)),
                                    "lrq": dict(quantize=LRQ(bits=3, group_size=32, iterations=60)),
                                    "cbq": dict(quantize=CBQ(bits=3, group_size=32, iterations=60)),
                                    "signround": dict(quantize=SignRound(bits=3, group_size=32, iterations=60))})
    output = {name: error for name, (_, error) in errors.items()}
    assert all(output[name] < output["rtn"] for name in ("lrq", "cbq", "signround")), errors


def test_a_block_with_no_targeted_layer_passes_both_streams_through(tiny_model_dir):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    recipe = Recipe(quantize=RTN(bits=4, group_size=32), include=(r"layers\.0\.",))
    result = compress_model(str(tiny_model_dir), recipe, calib=ids, progress=False)
    assert all(name.startswith("model.layers.0.") for name in result.report["layers"])
    first, second = result.report["block_output_error"]
    assert 0 < first and 0 < second < float("inf")


def test_float32_statistics_are_reported_and_compress_as_well_as_float64(demo_ids):
    reports, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in ("float64", "float32"):
            model, _, _ = load_model("demo")
            model.model.layers = model.model.layers[:2]
            recipe = Recipe(quantize=GPTQ(bits=3, group_size=32), compensate=EoRA(rank=8), gram_dtype=dtype)
            reports[dtype] = compress_model(model, recipe, calib=demo_ids, progress=False).report
    finally:
        torch.set_num_threads(threads)
    assert all(entry["gram_dtype"] == "float32" for entry in reports["float32"]["layers"].values())
    assert not any("gram_dtype" in entry for entry in reports["float64"]["layers"].values())
    assert sum("input statistics kept in float32" in note for note in reports["float32"]["notes"]) == 14
    errors = {dtype: sum(entry["relative_error"] for entry in report["layers"].values())
              for dtype, report in reports.items()}
    assert abs(errors["float32"] / errors["float64"] - 1) < 0.01, errors


def test_auto_keeps_float64_where_the_grams_fit(tiny_model_dir):
    report = run(tiny_model_dir, quantize=GPTQ(bits=4, group_size=32)).report
    assert not any("gram_dtype" in entry for entry in report["layers"].values())


def test_replayed_modules_give_the_same_model_and_skip_their_runs(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 4000, (4, 32), generator=torch.Generator().manual_seed(1))
    results, forward, default = {}, CompressedLinear.forward, pipeline.REPLAY_SHARE
    for share in (default, math.inf):  # inf: no memory for replays, every pass runs every module
        monkeypatch.setattr(pipeline, "REPLAY_SHARE", share)
        model, tokenizer, _ = load_model(str(tiny_model_dir))
        counts = {"attention": 0, "compressed linear": 0}
        for block in model.model.layers:
            block.self_attn.register_forward_pre_hook(
                lambda *_: counts.__setitem__("attention", counts["attention"] + 1))

        def counted(layer, x):
            counts["compressed linear"] += 1
            return forward(layer, x)

        monkeypatch.setattr(CompressedLinear, "forward", counted)
        result = compress_model(model, Recipe(quantize=GPTQ(bits=4, group_size=32)), calib=ids, progress=False)
        results[share] = ({k: v.clone() for k, v in result.model.state_dict().items()}, counts)
    (replayed, fewer), (plain, every) = results[default], results[math.inf]
    assert replayed.keys() == plain.keys() and all(torch.equal(replayed[k], plain[k]) for k in plain)
    # per block, the attention runs in the full-precision pass and the captures for q/k/v, o and gate/up; without
    # replays also in the capture for down_proj and the propagation. Compressed linears, per block: the captures for
    # o (q, k, v), gate/up (q, k, v, o), down (those and gate, up) and the propagation (all 7): 20; with replays
    # q, k, v (capture for o), o, then gate and up (capture for down), down (propagation): 7
    assert every == {"attention": 2 * 6, "compressed linear": 2 * 20}
    assert fewer == {"attention": 2 * 4, "compressed linear": 2 * 7}


def test_a_method_that_reads_no_full_precision_stream_keeps_a_few_windows_of_it(tiny_model_dir, monkeypatch):
    ids = torch.randint(0, 4000, (6, 32), generator=torch.Generator().manual_seed(2))
    results, default = {}, pipeline.REFERENCE_WINDOWS
    for windows in (default, 100):
        monkeypatch.setattr(pipeline, "REFERENCE_WINDOWS", windows)
        results[windows] = compress_model(str(tiny_model_dir), Recipe(quantize=GPTQ(bits=4, group_size=32)),
                                          calib=ids, progress=False)
    few, full = results[default], results[100]
    assert all(torch.equal(a, b) for a, b in zip(few.model.state_dict().values(), full.model.state_dict().values()))
    assert f"block output errors measured on the first {default} calibration windows" \
        in few.report["notes"]
    assert not any("measured on the first" in note for note in full.report["notes"])
    assert all(0 < error < 1 for error in few.report["block_output_error"])
    # GPTAQ reads the full-precision stream: it keeps every window
    gptaq = compress_model(str(tiny_model_dir), Recipe(quantize=GPTAQ(bits=4, group_size=32)), calib=ids,
                           progress=False)
    assert not any("measured on the first" in note for note in gptaq.report["notes"])


@pytest.mark.parametrize("gram_dtype, copies_fit", [("float64", True), ("float32", True), ("float64", False)])
def test_dense_copies_are_dropped_while_a_float32_step_solves(tiny_model_dir, monkeypatch, gram_dtype, copies_fit):
    """Float32 Grams mean memory is tight: the dequantized copies that the block's compressed layers keep for the
    capture passes are freed before the step's capture pass and not made again in that block (a 70B block's are
    2.3 GiB by down_proj). A block whose copies would take more than 1/DENSE_SHARE of the memory makes none."""
    if not copies_fit:  # no block's copies fit in a 2^-40 share of the memory
        monkeypatch.setattr(pipeline, "DENSE_SHARE", 1 << 40)
    kept, captured, original, original_capture = [], [], pipeline.compress_linear, pipeline.group_statistics

    def copies() -> int:
        return sum(bool(layer.dense_operands) for layer in model.modules() if isinstance(layer, CompressedLinear))

    def spy(name, linear, statistics, *args, **kwargs):
        kept.append(copies())
        return original(name, linear, statistics, *args, **kwargs)

    def spy_capture(*args, **kwargs):
        result = original_capture(*args, **kwargs)
        captured.append(copies())
        return result

    monkeypatch.setattr(pipeline, "compress_linear", spy)
    monkeypatch.setattr(pipeline, "group_statistics", spy_capture)
    model, _, _ = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 4000, (4, 32), generator=torch.Generator().manual_seed(5))
    result = compress_model(model, Recipe(quantize=GPTQ(bits=4, group_size=32), gram_dtype=gram_dtype), calib=ids,
                            progress=False)
    assert len(kept) == 14 and len(captured) == 8
    if gram_dtype == "float32" or not copies_fit:
        assert kept == [0] * 14 and captured == [0] * 8
    else:  # o_proj's solve follows a capture pass through the compressed q, k, v, which then keep their copies
        assert max(kept) > 0 and captured[1] > 0
    assert all(entry.get("gram_dtype", "float64") == gram_dtype for entry in result.report["layers"].values())
