"""An ONNX graph of the merged float32 model (input_ids -> logits, no KV cache) through torch.onnx.export, run with
onnxruntime and compared with the compressed model before it is kept. Needs the `onnx` extra."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.formats.dense import merge_layers


class LogitsOnly(nn.Module):
    """input_ids (batch, seq) -> logits (batch, seq, vocab), without the KV cache: the graph ONNX exports."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def sample_ids(model: nn.Module, tokenizer, batch: int = 2, length: int = 24) -> torch.Tensor:
    """A fixed batch of token ids for tracing and checking: the tokenizer's reading of a Python snippet, repeated."""
    vocab = model.config.vocab_size
    if tokenizer is not None:
        ids = tokenizer("def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n",
                        add_special_tokens=False)["input_ids"] * 4
        ids = torch.tensor(ids[:length]) % vocab
    else:
        ids = torch.arange(length) * 7 % vocab
    return torch.stack([ids, ids.flip(0)])[:batch]


def write_onnx(model: nn.Module, tokenizer, directory: Path, tolerance: float) -> dict:
    """model.onnx (+ external weights) from the merged fp32 model, checked with onnxruntime on two shapes."""
    try:
        import onnxruntime
    except ImportError:
        raise CompressError("onnx export needs onnx, onnxscript and onnxruntime: "
                            "pip install 'compress-llm[onnx]'") from None
    probe = sample_ids(model, tokenizer)
    probes = [probe, probe[:1, : probe.shape[1] // 2].contiguous()]  # a second shape: the graph's axes are dynamic
    with torch.no_grad():
        expected = [model(input_ids=ids, use_cache=False).logits.float() for ids in probes]
    wrapped = LogitsOnly(merge_layers(model).float()).eval()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        torch.onnx.export(wrapped, (probe,), directory / "model.onnx", dynamo=True, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
                          external_data=True)
    except Exception as exc:  # the exporter raises many error types; say which step failed, in one line
        raise CompressError(f"torch.onnx.export failed: {str(exc).splitlines()[0]}") from None
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    errors = []
    for ids, reference in zip(probes, expected):
        got = torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0])
        errors.append(((got - reference).abs().max() / reference.abs().max()).item())
    if max(errors) > tolerance:
        raise CompressError(f"the ONNX graph disagrees with the compressed model: relative logit error "
                            f"{max(errors):.2e} > {tolerance:g}")
    model.config.dtype = torch.float32
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"onnxruntime": onnxruntime.__version__, "shapes": [list(ids.shape) for ids in probes],
            "relative_logit_error": max(errors), "tolerance": tolerance}
