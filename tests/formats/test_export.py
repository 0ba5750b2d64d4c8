"""`compress export`: each format loaded by its own client (PEFT, transformers, onnxruntime, an independent GPTQ reader)
and compared with the compressed model it came from."""
import json

import pytest
import torch
from safetensors.torch import load_file

from compress.cli import main
from compress.errors import CompressError
from compress.formats import ExportOptions, export
from compress.formats.gptq import serving_warnings, write_gptq
from compress.layer import CompressedLinear
from compress.formats.lora import lora_rank, pad_factors
from compress.formats.native import load_compressed

FAST = ["--nsamples", "2", "--seqlen", "16", "--no-eval-ppl"]
GROUP = 32  # the tiny model's widths are 32, 64 and 160


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_model_dir):
    """Tiny compressed outputs: GPTQ sym 4-bit + EoRA rank 6, GPTQ asym act-order 4-bit, pure low-rank."""
    root = tmp_path_factory.mktemp("compressed")
    recipes = {
        "sym-eora": ["--wbits", "4", "--group-size", str(GROUP), "--quantize", "gptq", "--sym", "--compensate", "eora",
                     "--compensate-rank", "6"],
        "asym-actorder": ["--wbits", "4", "--group-size", str(GROUP), "--quantize", "gptq", "--act-order",
                          "--no-static-groups"],  # dynamic groups: the export carries g_idx
        "lowrank": ["--rank-budget", "0.5"],
        "bpw": ["--bpw", "3.6", "--quantize", "gptq"],  # layers of several bits and group sizes
    }
    for name, flags in recipes.items():
        assert main(["--model", str(tiny_model_dir), *flags, "--out", str(root / name)] + FAST) == 0
    return root


def layers(path):
    model = load_compressed(path)
    return model, {name: m for name, m in model.named_modules() if isinstance(m, CompressedLinear)}


# ----------------------------------------------------------------------------------------------------------------
# An independent reader of the GPTQ convention (PEERS.md section 4), for 2/4/8 bits: value j of a word sits at
# bits [j*bits, (j+1)*bits); qweight packs along the input (rows of the stored tensor), qzeros along the output.

def unpack_words_down(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(words, cols) int32 -> (words * 32/bits, cols): word r of a column holds its values 32/bits*r ..."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word) * bits).view(1, -1, 1)
    values = (packed.to(torch.int64).unsqueeze(1) >> shifts) & (2**bits - 1)
    return values.reshape(-1, packed.shape[1])


def read_gptq_layer(tensors: dict, name: str, bits: int, checkpoint_format: str):
    """(ints (out, in), zeros (groups, out), scales (groups, out), g_idx (in,)) read from the stored tensors."""
    ints = unpack_words_down(tensors[f"{name}.qweight"], bits).T
    stored = unpack_words_down(tensors[f"{name}.qzeros"].T, bits).T
    zeros = (stored + 1) % 2**bits if checkpoint_format == "gptq" else stored  # v1 stores z - 1
    return ints, zeros, tensors[f"{name}.scales"], tensors[f"{name}.g_idx"].long()


def dequantized(tensors: dict, name: str, bits: int, checkpoint_format: str) -> torch.Tensor:
    ints, zeros, scales, g_idx = read_gptq_layer(tensors, name, bits, checkpoint_format)
    return scales.float()[g_idx].T * (ints - zeros[g_idx].T).float()


@pytest.mark.parametrize("variant, checkpoint_format", [("sym-eora", "gptq"), ("asym-actorder", "gptq"),
                                                        ("asym-actorder", "gptq_v2")])
def test_gptq_tensors_read_back_as_the_projects_own_quantized_values(compressed, tmp_path, variant, checkpoint_format):
    out = tmp_path / "gptq"
    result = export(compressed / variant, "gptq", out, ExportOptions(checkpoint_format=checkpoint_format))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == json.loads((out / "quantize_config.json").read_text())
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == GROUP
    assert config["checkpoint_format"] == checkpoint_format and config["sym"] == (variant == "sym-eora")
    assert config["desc_act"] == (variant == "asym-actorder")
    tensors = load_file(out / "model.safetensors")
    _, own = layers(compressed / variant)
    assert len(own) == 14
    for name, layer in own.items():
        quantized = layer.base.operand()
        ints, zeros, scales, g_idx = read_gptq_layer(tensors, name, 4, checkpoint_format)
        assert tensors[f"{name}.qweight"].dtype == torch.int32 and scales.dtype == torch.float16
        assert torch.equal(ints, quantized.ints().long())
        assert torch.equal(zeros, quantized.zeros().T.long())
        assert torch.equal(scales, quantized.scales.T)
        expected_g_idx = quantized.g_idx if quantized.g_idx is not None else torch.arange(layer.in_features) // GROUP
        assert torch.equal(g_idx, expected_g_idx.long())
        assert f"{name}.weight" not in tensors
    if variant == "sym-eora":
        assert int(tensors["model.layers.0.self_attn.q_proj.qzeros"][0, 0]) == 0x77777777  # v1 symmetric 4-bit: 7s
    assert (result.warnings == []) == (variant == "sym-eora")


def test_gptq_config_is_read_by_transformers(compressed, tmp_path):
    from transformers import AutoConfig, GPTQConfig

    export(compressed / "sym-eora", "gptq", tmp_path / "gptq")
    config = GPTQConfig.from_dict(AutoConfig.from_pretrained(tmp_path / "gptq").quantization_config)
    settings = (config.bits, config.group_size, config.sym, config.desc_act, config.format)
    assert settings == (4, GROUP, True, False, "gptq")


def test_a_bpw_mix_exports_as_gptq_with_per_module_overrides(compressed, tmp_path):
    """Each layer's grid is the config's or its `dynamic` override's (GPTQModel's per-module format, first match
    wins): the reader applies them and gets every layer's own quantized values back."""
    from transformers import AutoConfig, GPTQConfig

    from compress.formats import read_quantized

    model, own = layers(compressed / "bpw")

    def grid(layer):  # one group per row is GPTQ's -1
        return layer.base.bits, -1 if layer.base.group_size == layer.in_features else layer.base.group_size

    grids = {grid(m) for m in own.values()}
    assert len(grids) > 1  # a mix, or this test shows nothing
    export(compressed / "bpw", "gptq", tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    overridden = {key[3:-1].replace("\\", "") for key in config["dynamic"]}
    assert overridden == {name for name, m in own.items() if grid(m) != (config["bits"], config["group_size"])}
    read = GPTQConfig.from_dict(AutoConfig.from_pretrained(tmp_path / "gptq").quantization_config)
    assert (read.bits, read.group_size) == (config["bits"], config["group_size"])
    weights = read_quantized(tmp_path / "gptq").weights
    for name, layer in own.items():
        assert torch.equal(weights[name], layer.base.operand().dequantize()), name


def library_decompressed(path):
    """The compressed-tensors library's own decompression of a pack-quantized directory: each module gets the scheme
    of the config group that targets it (apply_quantization_config), takes the checkpoint's tensors as they are,
    and ModelCompressor.decompress_model unpacks it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    config = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    apply_quantization_config(model, config)
    for file in path.glob("*.safetensors"):
        for key, tensor in load_file(file).items():
            owner, attribute = key.rsplit(".", 1)
            module = model.get_submodule(owner)
            if hasattr(module, attribute):
                delattr(module, attribute)
            module.register_parameter(attribute, torch.nn.Parameter(tensor, requires_grad=False))
    ModelCompressor(quantization_config=config).decompress_model(model)
    return model


@pytest.mark.parametrize("variant", ["bpw", "sym-eora"])
def test_compressed_tensors_export_is_what_the_library_decompresses(compressed, tmp_path, variant):
    """The library unpacks every layer to our own integers times our fp16 scales (in fp16, as it computes), one config
    group per grid; our reader gets the float32 values exactly."""
    from compress.formats import read_quantized

    _, own = layers(compressed / variant)
    exported = export(compressed / variant, "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    grids = {(m.base.bits, m.base.group_size) for m in own.values()}
    assert len(config["config_groups"]) == len(grids) and config["ignore"] == ["lm_head"]
    assert (len(grids) > 1) == any("config groups" in warning for warning in exported.warnings)
    model = library_decompressed(tmp_path / "ct")
    ours = read_quantized(tmp_path / "ct").weights
    for name, layer in own.items():
        values = layer.base.operand().dequantize()
        assert torch.equal(model.get_submodule(name).weight.detach(), values.half().float()), name
        assert torch.equal(ours[name], values), name
    assert (tmp_path / "ct" / "adapter").exists() == any(layer.up is not None for layer in own.values())


def test_act_order_groups_are_refused_for_compressed_tensors(compressed, tmp_path):
    with pytest.raises(CompressError, match="has act-order groups"):
        export(compressed / "asym-actorder", "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_transformers_loads_a_compressed_tensors_export(compressed, tmp_path):
    """transformers' compressed-tensors integration, decompressing on load, gives the quantized bases' values."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, own = layers(compressed / "sym-eora")
    export(compressed / "sym-eora", "compressed-tensors", tmp_path / "ct")
    config = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, quantization_config=config)
    for name, layer in own.items():
        assert torch.equal(model.get_submodule(name).weight.detach(),
                           layer.base.operand().dequantize().half().float()), name


def test_layers_left_out_stay_fp16_and_are_marked_skipped(compressed, tmp_path):
    from torch import nn

    model, own = layers(compressed / "sym-eora")
    name = "model.layers.1.mlp.down_proj"
    plain = nn.Linear(own[name].in_features, own[name].out_features, bias=False)
    model.set_submodule(name, plain)  # as if the recipe had excluded it
    tmp_path.joinpath("gptq").mkdir()
    warnings, _ = write_gptq(model, None, tmp_path / "gptq", {}, ExportOptions(), adapter_base="x")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["dynamic"] == {r"-:^model\.layers\.1\.mlp\.down_proj$": {}}
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    assert torch.equal(tensors[f"{name}.weight"], plain.weight.detach().half()) and f"{name}.qweight" not in tensors
    assert any("left out" in warning for warning in warnings)


def test_peft_adapter_on_the_gptq_base_equals_the_compressed_layers(compressed, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gptq"
    result = export(compressed / "sym-eora", "gptq", out)
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == adapter_config["lora_alpha"] == 8  # rank 6 padded to vLLM's 8
    assert result.checks["adapter_rank"] == 8 and result.checks["factor_ranks"] == [6]
    tensors = load_file(out / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    _, own = layers(compressed / "sym-eora")
    with torch.no_grad():
        for name in own:  # the base a serving stack dequantizes from the GPTQ tensors
            base.get_submodule(name).weight.copy_(dequantized(tensors, name, 4, "gptq"))
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    for name, layer in own.items():
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            got, expected = peft_model.base_model.model.get_submodule(name)(x), layer(x)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (name, (got - expected).abs().max())


def test_dense_export_loads_in_transformers_with_the_compressed_logits(compressed, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = layers(compressed / "sym-eora")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export(compressed / "sym-eora", "dense", tmp_path / "dense", ExportOptions(dtype="float32", max_shard_size="200KB"))
    index = json.loads((tmp_path / "dense" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    assert not any(isinstance(m, CompressedLinear) for m in dense.modules())
    with torch.no_grad():
        got = dense(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    export(compressed / "sym-eora", "dense", tmp_path / "dense16", ExportOptions(dtype="float16"))
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "dense16").eval()
    assert half.dtype == torch.float16


def test_onnx_export_runs_in_onnxruntime_with_the_compressed_logits(compressed, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, _ = layers(compressed / "asym-actorder")
    result = export(compressed / "asym-actorder", "onnx", tmp_path / "onnx")
    assert result.checks["relative_logit_error"] < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, model.config.vocab_size, (3, 7))  # a shape the export did not trace
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_native_copy_is_verified_and_loads(compressed, tmp_path):
    source = compressed / "asym-actorder"
    export(source, "native", tmp_path / "native")
    for file in source.iterdir():
        assert (tmp_path / "native" / file.name).read_bytes() == file.read_bytes(), file.name
    model, copy = load_compressed(source), load_compressed(tmp_path / "native")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, model(input_ids=ids).logits)
    broken = tmp_path / "broken"
    export(source, "native", broken)
    tensor_file = broken / next(iter(json.loads((broken / "compression_config.json").read_text())["files"]))
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 1
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CompressError, match="corrupt"):
        export(broken, "native", tmp_path / "again")
    assert not (tmp_path / "again").exists()


def refused(capsys, argv, message, out):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.strip().splitlines()[-1].startswith("compress: error:")
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_pure_low_rank_is_refused_for_gptq_unless_merged(capsys, compressed, tmp_path, tiny_model_dir):
    out = tmp_path / "gptq"
    refused(capsys, ["export", str(compressed / "lowrank"), "--format", "gptq", "--out", str(out)], "--merge-lowrank",
            out)
    assert main(["export", str(compressed / "lowrank"), "--format", "gptq", "--merge-lowrank", "--merge-bits", "8",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "14 layers merged" in err and "requantized" in err
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 8 and config["meta"]["merged_lowrank_layers"] == 14
    assert not (out / "adapter").exists()
    tensors = load_file(out / "model.safetensors")
    _, own = layers(compressed / "lowrank")
    for name, layer in own.items():  # 8-bit RTN of up @ down: close to the low-rank weight
        weight = layer.weight_approx()
        error = (dequantized(tensors, name, 8, "gptq") - weight).norm() / weight.norm()
        assert error < 0.02, (name, error)


def test_bad_exports_are_refused(capsys, compressed, tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    refused(capsys, ["export", str(tiny_model_dir), "--format", "dense", "--out", str(out)],
            "not a compressed model directory", out)
    refused(capsys, ["export", str(tmp_path / "missing"), "--format", "native", "--out", str(out)],
            "not a compressed model directory", out)
    out.mkdir()
    assert main(["export", str(compressed / "lowrank"), "--format", "dense", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(CompressError, match="unknown export format"):
        export(compressed / "lowrank", "awq", tmp_path / "g")


def test_serving_warnings_follow_vllm_kernel_routing():
    def config(bits, sym, group_size=128, fmt="gptq", desc_act=False):
        return {"bits": bits, "sym": sym, "group_size": group_size, "checkpoint_format": fmt, "desc_act": desc_act}

    assert serving_warnings(config(4, True), 0) == [] and serving_warnings(config(8, True, -1), 0) == []
    assert "Marlin" in serving_warnings(config(4, False), 0)[0]
    assert "Marlin" in serving_warnings(config(3, True), 0)[0]
    assert "group size 256" in serving_warnings(config(4, True, 256), 0)[0]
    assert any("vllm#26343" in w for w in serving_warnings(config(4, False, fmt="gptq_v2"), 0))
    assert any("vllm#26343" in w for w in serving_warnings(config(2, True, fmt="gptq_v2"), 0))
    assert not any("vllm#26343" in w for w in serving_warnings(config(4, True, fmt="gptq_v2"), 0))
    assert any("zero point 0" in w for w in serving_warnings(config(4, False), 3))
    assert any("act-order" in w for w in serving_warnings(config(4, True, desc_act=True), 0))


def test_lora_rank_is_padded_to_one_vllm_accepts():
    assert [lora_rank({r}) for r in (1, 8, 9, 64, 300, 321, 600)] == [8, 8, 16, 64, 320, 512, 600]
    up, down = torch.randn(10, 3), torch.randn(3, 7)
    padded_up, padded_down = pad_factors(up, down, 8)
    assert padded_up.shape == (10, 8) and padded_down.shape == (8, 7)
    assert torch.equal(padded_up @ padded_down, up @ down)
