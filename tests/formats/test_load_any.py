"""`compress eval` / `compress.formats.load_any` on every directory this tool reads or writes: native outputs, GPTQ
and pack-quantized checkpoints, each with or without the adapter/ that `compress export` or `compress compensate`
puts beside the weights. Each loaded model is compared with one built here from the pieces."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compress.cli import main
from compress.formats import export, load_any
from compress.formats.lora import read_lora_adapter
from compress.formats.native import load_compressed
from compress.layer import CompressedLinear
from compress.models import DEMO_DIR
from tests.conftest import tiny_llama
from tests.compensate.test_compensate import write_checkpoint

FAST = ["--nsamples", "2", "--seqlen", "16", "--no-eval-ppl"]
COMPENSATE_FAST = ["--rank", "8", "--nsamples", "4", "--seqlen", "32"]
# Two float32 computations of the same model that differ only in summation order (x @ base^T + (x @ down^T) @ up^T
# against x @ (base + up @ down)^T): the logits (|logit| < 1 here) agree to a few float32 ulps, about 3e-7. A real
# difference, e.g. one tensor rounded through fp16 once more, moves them by 1e-4 and more.
LOGITS_ATOL = 1e-5


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text((DEMO_DIR / "heldout.txt").read_text()[:4000])
    return path


def eval_ppl(directory, text, tmp_path) -> float:
    result = tmp_path / "eval.json"
    assert main(["eval", str(directory), "--ppl", str(text), "--seqlen", "32", "--json", str(result)]) == 0
    return json.loads(result.read_text())["perplexity"]


@pytest.fixture(scope="module")
def fp16_native(tmp_path_factory, demo_tokenizer):
    """A native output (GPTQ 4-bit sym + EoRA rank 6) of a tiny model stored in fp16: the GPTQ export stores the
    untouched tensors in fp16 too, so both directories hold the same numbers."""
    root = tmp_path_factory.mktemp("fp16")
    tiny_llama(vocab_size=len(demo_tokenizer)).half().save_pretrained(root / "model")
    demo_tokenizer.save_pretrained(root / "model")
    assert main(["--model", str(root / "model"), "--wbits", "4", "--group-size", "32", "--quantize", "gptq", "--sym",
                 "--compensate", "eora", "--compensate-rank", "6", "--out", str(root / "native")] + FAST) == 0
    return root / "native"


def test_eval_of_a_gptq_export_with_its_adapter_equals_the_native_model(fp16_native, tmp_path, eval_text):
    export(fp16_native, "gptq", tmp_path / "gptq")
    assert (tmp_path / "gptq" / "adapter").is_dir()
    native = load_compressed(fp16_native)
    loaded, tokenizer = load_any(tmp_path / "gptq")
    assert tokenizer is not None and not any(isinstance(m, CompressedLinear) for m in loaded.modules())
    ids = sample_ids(native)
    expected, got = logits(native, ids), logits(loaded, ids)
    assert torch.allclose(got, expected, rtol=0, atol=LOGITS_ATOL), (got - expected).abs().max()
    without = tmp_path / "gptq-without-adapter"
    export(fp16_native, "gptq", without)
    shutil.rmtree(without / "adapter")  # the base alone: the adapter is what closes the gap
    assert not torch.allclose(logits(load_any(without)[0], ids), expected, rtol=0, atol=100 * LOGITS_ATOL)
    ppl_native, ppl_gptq = eval_ppl(fp16_native, eval_text, tmp_path), eval_ppl(tmp_path / "gptq", eval_text, tmp_path)
    assert ppl_gptq == pytest.approx(ppl_native, rel=1e-5)


@pytest.mark.parametrize("kind", ["gptq", "gptq_v2", "pack-quantized"])
def test_a_foreign_checkpoint_loads_with_its_dequantized_weights(tiny_model_dir, tmp_path, kind):
    expected = write_checkpoint(tiny_model_dir, tmp_path / "q", kind, act_order=True)
    loaded, _ = load_any(tmp_path / "q")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w_hat in expected.items():
            assert torch.equal(loaded.get_submodule(name).weight, w_hat), name
            reference.get_submodule(name).weight.copy_(w_hat)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = sample_ids(reference)
    assert torch.equal(logits(loaded, ids), logits(reference, ids))


def test_eval_of_a_compensated_gptq_checkpoint_adds_the_adapter(tiny_model_dir, tmp_path, eval_text):
    from peft import PeftModel

    expected = write_checkpoint(tiny_model_dir, tmp_path / "q", "gptq", act_order=True)
    out = tmp_path / "out"
    assert main(["compensate", "--model", str(tmp_path / "q"), "--original", str(tiny_model_dir), "--out", str(out),
                 *COMPENSATE_FAST]) == 0
    loaded, _ = load_any(out)
    base, _ = load_any(tmp_path / "q")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w_hat in expected.items():  # lora_alpha = r: W_hat + lora_B @ lora_A
            a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"].float() for x in "AB")
            reference.get_submodule(name).weight.copy_(w_hat + b @ a)
    ids = sample_ids(reference)
    got = logits(loaded, ids)
    assert torch.allclose(got, logits(reference, ids), rtol=0, atol=LOGITS_ATOL)
    assert not torch.allclose(got, logits(base, ids), rtol=0, atol=100 * LOGITS_ATOL)
    peft_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, w_hat in expected.items():
            peft_base.get_submodule(name).weight.copy_(w_hat)
    peft_model = PeftModel.from_pretrained(peft_base, out / "adapter").eval()  # PEFT's own reading of the adapter
    assert torch.allclose(got, logits(peft_model, ids), rtol=0, atol=LOGITS_ATOL)
    ppl_out, ppl_base = eval_ppl(out, eval_text, tmp_path), eval_ppl(tmp_path / "q", eval_text, tmp_path)
    assert ppl_out != pytest.approx(ppl_base, rel=1e-4)


@pytest.mark.parametrize("alpha, alpha_pattern, rslora", [(16, {}, False), (16, {"v_proj": 3}, False),
                                                          (8, {}, True)])
def test_lora_reader_gives_the_delta_peft_merges(tmp_path, alpha, alpha_pattern, rslora):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(vocab_size=64)
    base = {key: t.clone() for key, t in model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=alpha, alpha_pattern=alpha_pattern, use_rslora=rslora,
                        target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().state_dict()
    factors = read_lora_adapter(tmp_path / "adapter")
    assert len(factors) == 3 * 2
    for name, (up, down) in factors.items():
        delta = merged[f"{name}.weight"] - base[f"{name}.weight"]
        assert delta.abs().max() > 0
        assert torch.allclose(up @ down, delta, rtol=1e-4, atol=1e-6), (name, (up @ down - delta).abs().max())
