"""`compress export --format gguf`: read back with llama.cpp's own Python reader (`gguf`), every tensor dequantized by
its reference dequantizer and compared with the compressed model; llama.cpp itself runs the file when installed."""
import json

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.formats.native import load_compressed
from compress.layer import CompressedLinear

gguf = pytest.importorskip("gguf")

FAST = ["--nsamples", "2", "--seqlen", "16", "--no-eval-ppl"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_model_dir):
    """Tiny compressed outputs, one per kind of GGUF block; the tiny model's widths are 64 and 160."""
    root = tmp_path_factory.mktemp("compressed")
    recipes = {
        "sym4": ["--wbits", "4", "--group-size", "32", "--quantize", "gptq", "--sym"],  # Q4_0
        "asym3": ["--wbits", "3", "--group-size", "64", "--quantize", "gptq"],  # Q4_1 (down_proj: groups of 32)
        "sym8": ["--wbits", "8", "--group-size", "32", "--quantize", "rtn", "--sym"],  # Q8_0
        "actorder": ["--wbits", "4", "--group-size", "32", "--quantize", "gptq", "--act-order",
                     "--no-static-groups"],  # g_idx: re-quantized
        "eora": ["--wbits", "4", "--group-size", "32", "--quantize", "gptq", "--compensate", "eora",
                 "--compensate-rank", "4"],
    }
    for name, flags in recipes.items():
        assert main(["--model", str(tiny_model_dir), *flags, "--out", str(root / name)] + FAST) == 0
    return root


def converter_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """The rows of q/k as llama.cpp's convert_hf_to_gguf.py permutes them (LlamaModel.permute), written from its
    description: reshape to (heads, 2, head_dim / 2, in), swap the middle axes."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def read_gguf(path):
    reader = gguf.GGUFReader(str(path / "model.gguf"))
    tensors = {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return reader, tensors


def expected_weights(model) -> dict[str, tuple[np.ndarray, CompressedLinear | None]]:
    """Each GGUF tensor name: the compressed model's float32 weight in llama.cpp's row order, and its layer."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = {}
    compressed = tuple(f"{name}." for name, layer in model.named_modules() if isinstance(layer, CompressedLinear))
    for key, value in model.state_dict().items():
        if key.startswith(compressed) or "rotary" in key:
            continue
        out[names.get_name(key, try_suffixes=(".weight",))] = (value.float().numpy(), None)
    for name, layer in model.named_modules():
        if isinstance(layer, CompressedLinear):
            weight = layer.weight_approx().detach().numpy()
            if name.endswith("q_proj"):
                weight = converter_order(weight, model.config.num_attention_heads)
            elif name.endswith("k_proj"):
                weight = converter_order(weight, model.config.num_key_value_heads)
            out[names.get_name(f"{name}.weight", try_suffixes=(".weight",))] = (weight, layer)
    return out


def within_q8_0(stored: np.ndarray, weight: np.ndarray) -> bool:
    """Q8_0 rounding: half a step d = block max / 127 per block of 32, d itself rounded to fp16 (127 d 2^-11)."""
    rows = weight.shape[0]
    step = np.abs(weight).reshape(rows, -1, 32).max(-1, keepdims=True) / 127
    return bool((np.abs(stored - weight).reshape(rows, -1, 32) <= step * (0.5 + 127 * 2**-11) + 1e-9).all())


@pytest.mark.parametrize("variant, kind", [("sym4", "Q4_0"), ("asym3", "Q4_1"), ("sym8", "Q8_0")])
def test_quantized_layers_carry_their_integers_into_gguf_blocks(compressed, tmp_path, variant, kind):
    out = tmp_path / "gguf"
    assert main(["export", str(compressed / variant), "--format", "gguf", "--out", str(out)]) == 0
    model = load_compressed(compressed / variant)
    _, tensors = read_gguf(out)
    expected = expected_weights(model)
    assert set(tensors) == set(expected)  # a tied head aside, every tensor of the model and nothing else
    for name, (weight, layer) in expected.items():
        stored_type, stored = tensors[name]
        assert stored.shape == weight.shape, name
        if layer is None:  # norms in float32, embeddings and head in fp16
            assert np.array_equal(stored, weight.astype(np.float16 if weight.ndim == 2 else np.float32)), name
            continue
        if layer.base.operand().group_size % 32:  # groups of 40 (160 columns, 64 asked): not GGUF blocks
            assert stored_type.name == "Q8_0", name
            continue
        assert stored_type.name == kind, name
        if kind == "Q4_1":  # the integers exactly; the offset m = -scale * zero rounded to fp16
            quantized = layer.base.operand()
            scales = quantized.scales.float().repeat_interleave(quantized.group_size, 1).numpy()
            offsets = -scales * quantized.zeros().repeat_interleave(quantized.group_size, 1).numpy()
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = model.config.num_attention_heads if "attn_q" in name else model.config.num_key_value_heads
                scales, offsets = converter_order(scales, heads), converter_order(offsets, heads)
            ints = np.rint((stored - offsets.astype(np.float16).astype(np.float32)) / scales)
            assert np.abs(ints * scales + offsets - weight).max() < 1e-5 * np.abs(weight).max(), name
            assert np.abs(stored - weight).max() <= np.abs(offsets).max() * 2**-10, name
        else:  # d (q - 8) and d q: our scale times our integer, exactly
            assert np.array_equal(stored, weight), name


def test_file_metadata_is_what_llama_cpp_reads(compressed, tmp_path, demo_tokenizer):
    out = tmp_path / "gguf"
    assert main(["export", str(compressed / "sym4"), "--format", "gguf", "--out", str(out)]) == 0
    reader, _ = read_gguf(out)
    model = load_compressed(compressed / "sym4")

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == model.config.num_hidden_layers
    assert field("llama.attention.head_count_kv") == model.config.num_key_value_heads
    assert field("llama.rope.dimension_count") == model.config.hidden_size // model.config.num_attention_heads
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size
    vocab = demo_tokenizer.get_vocab()
    assert all(tokens[index] == text for text, index in vocab.items())
    assert field("tokenizer.ggml.eos_token_id") == demo_tokenizer.eos_token_id
    assert json.loads((out / "export.json").read_text())["checks"]["carried_over"] == 14


def test_layers_gguf_cannot_hold_are_requantized_and_named(compressed, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(compressed / "actorder"), "--format", "gguf", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "14 quantized layers" in err and "model.layers.0.self_attn.q_proj" in err and "Q8_0" in err
    model = load_compressed(compressed / "actorder")
    _, tensors = read_gguf(out)
    for name, (weight, layer) in expected_weights(model).items():
        if layer is not None:  # Q8_0 of the act-order weight: within its 8-bit rounding
            assert tensors[name][0].name == "Q8_0"
            assert within_q8_0(tensors[name][1], weight), name


def test_low_rank_factors_are_refused_unless_merged(compressed, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(compressed / "eora"), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--merge-lowrank" in err and "Traceback" not in err and not out.exists()
    assert main(["export", str(compressed / "eora"), "--format", "gguf", "--merge-lowrank", "--out", str(out)]) == 0
    assert "merged and re-quantized to Q8_0" in capsys.readouterr().err
    model = load_compressed(compressed / "eora")
    _, tensors = read_gguf(out)
    for name, (weight, layer) in expected_weights(model).items():
        if layer is not None:  # base + up @ down, merged, within Q8_0's rounding
            assert within_q8_0(tensors[name][1], weight), name


def test_pre_tokenizers_are_named_as_llama_cpp_names_them():
    from compress.formats.gguf import pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer({"pre_tokenizer": digits}) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"}},
        {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer({"pre_tokenizer": llama3}) == "llama-bpe"
    assert pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}}) is None
    assert pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": []}}) is None


def test_other_architectures_are_refused(tmp_path, capsys):
    from compress.formats.gguf import llama_config

    class Config:
        model_type = "phi3"

    class Model:
        config = Config()

    with pytest.raises(Exception, match="llama architecture"):
        llama_config(Model())


@pytest.mark.slow
def test_llama_cpp_runs_the_file_with_the_compressed_logits(compressed, tmp_path, demo_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "gguf"
    assert main(["export", str(compressed / "sym4"), "--format", "gguf", "--out", str(out)]) == 0
    model = load_compressed(compressed / "sym4")
    ids = demo_tokenizer("def add(a, b):\n    return a + b\n", add_special_tokens=False)["input_ids"][:32]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids)])
    assert np.abs(logits - expected).max() < 0.02 * np.abs(expected).max()
