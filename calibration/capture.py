"""Activation capture: the first block's inputs, and per-linear input Gram matrices accumulated in float64."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class GramAccumulator:
    """Streaming sum of x x^T over all tokens seen, in float64: gram (in, in) and the token count."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.gram.device, torch.float64)
        self.gram.addmm_(x.T, x)
        self.count += x.shape[0]


@contextmanager
def record_grams(linears: dict[str, nn.Module]):
    """Within the block, accumulate the input Gram of each named linear; yields {name: GramAccumulator}."""
    grams = {name: GramAccumulator(layer.in_features) for name, layer in linears.items()}
    handles = [layer.register_forward_pre_hook(lambda _m, args, acc=grams[name]: acc.add(args[0]))
               for name, layer in linears.items()]
    try:
        yield grams
    finally:
        for handle in handles:
            handle.remove()


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run the model up to its first decoder block on each sample: (nsamples, seqlen, hidden) inputs and the
    keyword arguments the block receives (position embeddings, mask, ...), identical for every window."""
    inputs, block_kwargs = [], {}

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden)
        block_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for sample in input_ids:
            try:
                model(input_ids=sample[None], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(inputs), block_kwargs


@torch.no_grad()
def run_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict, batch_size: int = 8) -> torch.Tensor:
    """The block's outputs for (nsamples, seqlen, hidden) inputs, `batch_size` windows at a time."""
    outputs = []
    for start in range(0, len(hidden), batch_size):
        out = block(hidden[start: start + batch_size], **block_kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outputs)
