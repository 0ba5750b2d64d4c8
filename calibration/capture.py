"""Activation capture: the first block's inputs, and per-linear input Gram matrices accumulated in float64."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class GramAccumulator:
    """Streaming float64 sums over the tokens seen: gram = sum x x^T (in, in), the token count, and with
    `cross` also cross = sum (x_fp - x) x^T, the full-precision stream's offset (SAES-SVD's Delta)."""

    def __init__(self, in_features: int, cross: bool = False, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.cross = torch.zeros_like(self.gram) if cross else None
        self.count = 0

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.gram.device, torch.float64)
        self.gram.addmm_(x.T, x)
        if self.cross is not None:
            self.cross.addmm_((x_fp.reshape(x.shape).to(x) - x).T, x)
        self.count += x.shape[0]

    def finish(self) -> "GramAccumulator":
        """Make the Gram exactly symmetric (GEMM sums may differ from their transpose in the last bit), which lets
        the eigensolver use one triangle as its workspace and restore it (compress.linalg.eigh_)."""
        symmetrize_(self.gram)
        return self


def symmetrize_(matrix: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Copy the lower triangle onto the upper one, in place, a block of rows at a time."""
    n = len(matrix)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        matrix[start:stop, stop:] = matrix[stop:, start:stop].T
        block = matrix[start:stop, start:stop]
        block.copy_(block.tril() + block.tril(-1).T)
    return matrix


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
        for accumulator in grams.values():
            accumulator.finish()


@torch.no_grad()
def paired_statistics(block: nn.Module, linears: dict[str, nn.Module], hidden: torch.Tensor, fp_hidden: torch.Tensor,
                      block_kwargs: dict, cross: bool = False, batch_size: int = 8) -> tuple[dict[str, GramAccumulator], torch.Tensor]:
    """Run the still-uncompressed block on both streams, batch by batch, and return the input statistics of its
    linears in the compressed stream (with their cross term against the full-precision stream when `cross`),
    and the full-precision stream's outputs.

    Linears that read the very same tensor (q/k/v, gate/up) share one accumulator: same Gram, a third of the memory.
    The streams may live elsewhere (CPU, half precision) than the block: each batch visits the block's device."""
    device = block_device(block)
    stats = {name: GramAccumulator(layer.in_features, cross, device) for name, layer in linears.items()}
    fp_inputs: dict[str, torch.Tensor] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # this batch's inputs; kept alive so that `is` cannot match a reused one
    phase = {"fp": True}

    def hook(name):
        def record(_module, args):
            if phase["fp"]:
                if cross:
                    fp_inputs[name] = args[0]
                return
            x_fp = fp_inputs.pop(name, None)
            owner = next((first for tensor, first in seen if tensor is args[0]), None)
            if owner is None:
                seen.append((args[0], name))
                stats[name].add(args[0], x_fp)
            else:
                stats[name] = stats[owner]
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in linears.items()]
    fp_outputs = []
    try:
        for start in range(0, len(hidden), batch_size):
            phase["fp"] = True
            fp_outputs.append(_through(block, fp_hidden[start: start + batch_size], block_kwargs))
            phase["fp"] = False
            seen.clear()
            _through(block, hidden[start: start + batch_size], block_kwargs)
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    for accumulator in {id(acc): acc for acc in stats.values()}.values():
        accumulator.finish()
    return stats, torch.cat(fp_outputs)


def block_parameter(block: nn.Module) -> torch.Tensor:
    """A floating parameter of the block: where and in which dtype it computes."""
    return next(p for p in block.parameters() if p.is_floating_point())


def block_device(block: nn.Module) -> torch.device:
    return block_parameter(block).device


def _through(block: nn.Module, batch: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
    """The block's output for one batch of windows, computed on the block's device and dtype, returned where and
    in the dtype the batch came."""
    weight = block_parameter(block)
    out = _first(block(batch.to(weight.device, weight.dtype), **block_kwargs))
    return out.to(batch.device, batch.dtype)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


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
    return torch.cat([_through(block, hidden[start: start + batch_size], block_kwargs)
                      for start in range(0, len(hidden), batch_size)])
