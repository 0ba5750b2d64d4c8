"""Architectures as data: the main job on tiny models of each supported family, and a clear error for others."""
import dataclasses

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

from compress import GPTQ, SVDLLM, Calibration, CompressError, Recipe, compress_model, load_compressed, save_compressed
from compress.architectures import ARCHITECTURES, architecture
from compress.cli import main
from compress.layer import CompressedLinear

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False)
FAMILIES = {
    "llama": lambda vocab: LlamaConfig(vocab_size=vocab, **SHAPE),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, sliding_window=None, **SHAPE),
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, **SHAPE),
    "qwen3": lambda vocab: Qwen3Config(vocab_size=vocab, head_dim=16, **SHAPE),
    "phi3": lambda vocab: Phi3Config(vocab_size=vocab, pad_token_id=0, **SHAPE),
}


def tiny(family: str, vocab: int):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family](vocab)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_main_job_runs_loads_and_generates(tmp_path, capsys, demo_tokenizer, family):
    directory = tmp_path / family
    tiny(family, len(demo_tokenizer)).save_pretrained(directory)
    demo_tokenizer.save_pretrained(directory)
    out = tmp_path / "out"
    code = main(["--model", str(directory), "--rank-budget", "0.5", "--wbits", "4", "--group-size", "32",
                 "--nsamples", "4", "--seqlen", "16", "--no-eval-ppl", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    model = load_compressed(out)
    arch = ARCHITECTURES[family]
    compressed = {name for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert compressed == {f"{arch.blocks}.{i}.{local}" for i in range(2) for local in arch.linears}
    prompt = torch.tensor([demo_tokenizer("def f(x):")["input_ids"]])
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 5)


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_true_sequential_groups_follow_the_data_flow(family):
    """Each layer of a group is compressed with the earlier groups already replaced: the Gram that o_proj saw
    equals the one captured by hand from the block with q/k/v compressed."""
    model = tiny(family, 256)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    recipe = Recipe(quantize=GPTQ(bits=3, group_size=32), calibration=Calibration(nsamples=4, seqlen=16))
    arch = architecture(model)
    first, o_proj = arch.groups[0], arch.groups[1][0]
    block = model.get_submodule(arch.blocks)[0]
    from calibration import capture_block_inputs, record_grams

    hidden, kwargs = capture_block_inputs(model, block, ids)
    results = {}
    for true_sequential in (False, True):
        copy = tiny(family, 256)
        result = compress_model(copy, dataclasses.replace(recipe, true_sequential=true_sequential), calib=ids,
                                progress=False)
        results[true_sequential] = result.report["layers"][f"{arch.blocks}.0.{o_proj}"]["relative_error"]
        if true_sequential:
            compressed_block = copy.get_submodule(arch.blocks)[0]
    # by hand: the original block with the first group replaced by its compressed layers
    for local in first:
        block.set_submodule(local, compressed_block.get_submodule(local))
    with record_grams({o_proj: block.get_submodule(o_proj)}) as grams:
        block(hidden, **kwargs)
    from compress.linalg import output_error

    layer = compressed_block.get_submodule(o_proj)
    original = tiny(family, 256).get_submodule(arch.blocks)[0].get_submodule(o_proj).weight.detach().float()
    # the pipeline's Gram of a quantize-only recipe sums float32 products: equal to float32 rounding
    by_hand = output_error(original, layer.weight_approx(), grams[o_proj].gram)
    assert by_hand == pytest.approx(results[True], rel=1e-6)
    assert by_hand != pytest.approx(results[False], rel=1e-4)


def test_unknown_family_is_refused_in_one_line(tmp_path, capsys, demo_tokenizer):
    directory = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(demo_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    demo_tokenizer.save_pretrained(directory)
    code = main(["--model", str(directory), "--wbits", "4", "--nsamples", "2", "--seqlen", "16", "--no-eval-ppl",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([line for line in err if "error" in line]) == 1
    assert "no architecture entry for model type 'gpt2'" in err[-1] and "compress/architectures.py" in err[-1]
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_match_its_entry_is_refused():
    model = tiny("llama", 256)
    model.model.layers[0].mlp.extra = torch.nn.Linear(4, 4)
    with pytest.raises(CompressError, match=r"missing none, not listed \['mlp.extra'\]"):
        architecture(model)
    renamed = tiny("llama", 256)
    for block in renamed.model.layers:  # the attention under another name: its linears and the sublayer go missing
        block.attention = block.self_attn
        del block.self_attn
    with pytest.raises(CompressError, match=r"missing \['self_attn.q_proj'.*'self_attn'\]"):
        architecture(renamed)


def test_lorap_is_refused_for_fused_projections():
    from compress import LoRAP

    with pytest.raises(CompressError, match="lorap needs separate attention and MLP projections"):
        compress_model(tiny("phi3", 256), Recipe(factorize=LoRAP(0.5)), calib=torch.zeros(2, 8, dtype=torch.long),
                       progress=False)


def test_saved_phi3_output_round_trips(tmp_path):
    model = tiny("phi3", 256)
    model.config.dtype = torch.float32  # the untouched tensors are stored in it: the logits then match exactly
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    result = compress_model(model, Recipe(factorize=SVDLLM(0.5), calibration=Calibration(nsamples=4, seqlen=16)),
                            calib=ids, progress=False)
    save_compressed(result, tmp_path / "phi3")
    loaded = load_compressed(tmp_path / "phi3")
    torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=0)
