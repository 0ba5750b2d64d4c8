"""Decoder-block problems shared by the learned quantizers' tests (LRQ, SignRound)."""
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from calibration import block_linears, sample_windows
from calibration.capture import capture_block_inputs, run_block
from compress.models import DEMO_DIR, load_model


def problem_from(model, input_ids: torch.Tensor):
    """Block 0 of `model`, its linears {full name: linear}, its inputs for `input_ids`, kwargs and fp outputs."""
    block = model.model.layers[0]
    inputs, kwargs = capture_block_inputs(model, block, input_ids)
    targets = run_block(block, inputs, kwargs)
    linears = {f"model.layers.0.{name}": layer for name, layer in block_linears(block).items()}
    return block, linears, inputs, targets, kwargs


def tiny_block_problem(seqlen: int):
    """A real tiny Llama block (random weights) with inputs (8, seqlen, 64)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=128)
    model = LlamaForCausalLM(config).eval()
    return problem_from(model, torch.randint(0, 128, (8, seqlen), generator=torch.Generator().manual_seed(1)))


def demo_block_problem():
    """Block 0 of the trained demo model with inputs (4, 64, 256) from its calibration text: quality claims need
    weights with structure, which random ones lack."""
    model, tokenizer, _ = load_model("demo")
    text = (DEMO_DIR / "calibration.txt").read_text()
    return problem_from(model, sample_windows(tokenizer, text, nsamples=4, seqlen=64, seed=0))


def block_error(block, linears, quantized, inputs, targets, kwargs):
    """Mean squared block-output error with the dequantized weights swapped in, on a copy of the block."""
    names = {id(module): name for name, module in block.named_modules()}
    copied = copy.deepcopy(block)
    for full, linear in linears.items():
        copied.get_submodule(names[id(linear)]).weight.data = quantized[full].dequantize()
    return (run_block(copied, inputs, kwargs) - targets).pow(2).mean().item()
