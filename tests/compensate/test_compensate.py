"""`compress compensate` on checkpoints built here by following the GPTQ and compressed-tensors conventions."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.formats import load_any, read_quantized
from compress.formats.native import load_compressed
from compress.layer import CompressedLinear
from compress.cli import main
from tests.formats.test_packing import ct_checkpoint, gptq_checkpoint

BITS, GROUP = 4, 32


def rtn_grid(weight: torch.Tensor, g_idx: torch.Tensor):
    """Asymmetric min-max ints, zeros and fp16 scales per (group, row), written out here, independent of
    kernels.grid."""
    out_features, _ = weight.shape
    groups = int(g_idx.max()) + 1
    scales, zeros = torch.zeros(groups, out_features), torch.zeros(groups, out_features, dtype=torch.int64)
    q = torch.zeros_like(weight, dtype=torch.int64)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        block = weight[:, cols]
        low, high = block.min(1).values.clamp(max=0), block.max(1).values.clamp(min=0)
        scale = ((high - low) / (2**BITS - 1)).clamp(min=1e-6).half().float()
        zero = torch.round(-low / scale).clamp(0, 2**BITS - 1)
        q[:, cols] = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, 2**BITS - 1).long()
        scales[g], zeros[g] = scale, zero.long()
    expected = scales[g_idx].T * (q - zeros[g_idx].T).float()
    return q, zeros, scales, expected


def write_checkpoint(tiny_model_dir, path, kind: str, act_order: bool):
    state = load_file(tiny_model_dir / "model.safetensors")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    expected, tensors = {}, {}
    for key, weight in state.items():
        if ".layers." not in key or not key.endswith("_proj.weight"):
            tensors[key] = weight
            continue
        name = key.removesuffix(".weight")
        in_features = weight.shape[1]
        g_idx = torch.arange(in_features) // GROUP
        if act_order:
            g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(len(name)))]
        q, zeros, scales, expected[name] = rtn_grid(weight.float(), g_idx)
        if kind.startswith("gptq"):
            qweight, qzeros, scales16, g, _ = gptq_checkpoint(q, zeros, scales, g_idx, BITS, kind)
            tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales16,
                            f"{name}.g_idx": g})
        else:
            packed, zero_point = ct_checkpoint(q - 2 ** (BITS - 1), (zeros - 2 ** (BITS - 1)).T, BITS, dense=True)
            tensors.update({f"{name}.weight_packed": packed, f"{name}.weight_scale": scales.T.half().contiguous(),
                            f"{name}.weight_zero_point": zero_point.contiguous(),
                            f"{name}.weight_shape": torch.tensor(weight.shape)})
            if act_order:
                tensors[f"{name}.weight_g_idx"] = g_idx.int()
    if kind.startswith("gptq"):
        config["quantization_config"] = {"quant_method": "gptq", "bits": BITS, "group_size": GROUP, "sym": False,
                                         "desc_act": act_order, "checkpoint_format": kind}
    else:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.12.2",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": BITS, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP,
                "actorder": "group" if act_order else None}}}}
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))
    for file in tiny_model_dir.glob("tokenizer*"):
        (path / file.name).write_bytes(file.read_bytes())
    return expected


@pytest.mark.parametrize("kind, act_order", [("gptq", False), ("gptq", True), ("gptq_v2", True),
                                             ("pack-quantized", False), ("pack-quantized", True)])
def test_dequantized_weights_come_back_exactly(tiny_model_dir, tmp_path, kind, act_order):
    expected = write_checkpoint(tiny_model_dir, tmp_path / "q", kind, act_order)
    weights = read_quantized(tmp_path / "q").weights
    assert weights.keys() == expected.keys() and len(weights) == 14
    for name in expected:
        assert torch.equal(weights[name], expected[name]), name


def test_compensate_keeps_the_quantized_files_and_adds_an_adapter(tiny_model_dir, tmp_path):
    expected = write_checkpoint(tiny_model_dir, tmp_path / "q", "gptq", act_order=True)
    out = tmp_path / "out"
    argv = ["compensate", "--model", str(tmp_path / "q"), "--original", str(tiny_model_dir), "--rank", "8",
            "--method", "lorc", "--nsamples", "4", "--seqlen", "32", "--out", str(out)]
    assert main(argv) == 0
    for file in (tmp_path / "q").iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and "q_proj" in config["target_modules"]
    original = load_file(tiny_model_dir / "model.safetensors")
    for name, w_hat in expected.items():
        a = adapter[f"base_model.model.{name}.lora_A.weight"].float()
        b = adapter[f"base_model.model.{name}.lora_B.weight"].float()
        weight = original[f"{name}.weight"].float()
        assert a.shape == (8, weight.shape[1]) and b.shape == (weight.shape[0], 8)
        assert (weight - w_hat - b @ a).norm() < (weight - w_hat).norm()  # LoRC: the error's best rank-8 part
    report = json.loads((out / "compensation.json").read_text())
    assert report["source_format"] == "gptq (gptq)" and len(report["report"]["layers"]) == 14


def test_compensate_refuses_a_plain_model(capsys, tiny_model_dir, tmp_path):
    code = main(["compensate", "--model", str(tiny_model_dir), "--original", str(tiny_model_dir), "--out",
                 str(tmp_path / "o")])
    assert code == 2 and "not a quantized checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_adapter_loads_in_peft_and_reproduces_the_compensated_layers(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    expected = write_checkpoint(tiny_model_dir, tmp_path / "q", "gptq_v2", act_order=False)
    out = tmp_path / "out"
    assert main(["compensate", "--model", str(tmp_path / "q"), "--original", str(tiny_model_dir), "--rank", "8",
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w_hat in expected.items():  # the base a serving stack dequantizes
            model.get_submodule(name).weight.copy_(w_hat)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(model, out / "adapter").eval()
    for name, w_hat in expected.items():
        a = adapter[f"base_model.model.{name}.lora_A.weight"].float()
        b = adapter[f"base_model.model.{name}.lora_B.weight"].float()
        x = torch.randn(3, w_hat.shape[1])
        with torch.no_grad():
            got = peft_model.base_model.model.get_submodule(name)(x)
        assert torch.allclose(got, x @ (w_hat + b @ a).T, atol=1e-4), (name, (got - x @ (w_hat + b @ a).T).abs().max())


def one_line_error(capsys, argv, message, out):
    capsys.readouterr()  # what earlier commands printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("compress: error:") and message in err, err
    assert not out.exists()


def test_compensate_of_a_native_output_takes_the_model_it_records(tiny_model_dir, tmp_path):
    native = tmp_path / "native"
    assert main(["--model", str(tiny_model_dir), "--wbits", "3", "--group-size", str(GROUP), "--nsamples", "2",
                 "--seqlen", "16", "--no-eval-ppl", "--out", str(native)]) == 0
    assert json.loads((native / "compression_config.json").read_text())["base_model"] == str(tiny_model_dir)
    flags = ["--rank", "4", "--nsamples", "4", "--seqlen", "32"]
    assert main(["compensate", "--model", str(native), "--out", str(tmp_path / "recorded"), *flags]) == 0
    assert main(["compensate", "--model", str(native), "--original", str(tiny_model_dir),
                 "--out", str(tmp_path / "given"), *flags]) == 0
    recorded, given = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
                       for name in ("recorded", "given"))
    assert recorded.keys() == given.keys() and len(recorded) == 2 * 14
    assert all(torch.equal(recorded[key], given[key]) for key in recorded)
    records = [json.loads((tmp_path / name / "compensation.json").read_text()) for name in ("recorded", "given")]
    assert records[0]["original"] == records[1]["original"] == str(tiny_model_dir)
    assert records[0]["source_format"] == "compress-native"
    loaded, _ = load_any(tmp_path / "recorded")  # what compress eval runs: the native layers plus the adapter
    for name, layer in load_compressed(native).named_modules():
        if isinstance(layer, CompressedLinear):
            a, b = (recorded[f"base_model.model.{name}.lora_{x}.weight"].float() for x in "AB")
            assert torch.equal(loaded.get_submodule(name).weight, layer.weight_approx() + b @ a), name


def test_compensate_of_a_foreign_checkpoint_needs_original(capsys, tiny_model_dir, tmp_path):
    write_checkpoint(tiny_model_dir, tmp_path / "q", "gptq", act_order=False)
    out = tmp_path / "out"
    one_line_error(capsys, ["compensate", "--model", str(tmp_path / "q"), "--rank", "4", "--out", str(out)],
                   "does not record the full-precision model it was quantized from: pass --original MODEL", out)


def test_compensate_names_a_recorded_model_that_does_not_load(capsys, tiny_model_dir, tmp_path):
    native = tmp_path / "native"
    assert main(["--model", str(tiny_model_dir), "--wbits", "4", "--group-size", str(GROUP), "--nsamples", "2",
                 "--seqlen", "16", "--no-eval-ppl", "--out", str(native)]) == 0
    config = json.loads((native / "compression_config.json").read_text())
    config["base_model"] = str(tmp_path / "moved-away")
    (native / "compression_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    one_line_error(capsys, ["compensate", "--model", str(native), "--out", str(out)],
                   f"records its full-precision model as '{tmp_path / 'moved-away'}'", out)
