"""Activation capture: the first block's inputs, and per-linear input Gram matrices accumulated in float64 (float32 for
a layer too wide for float64, see compress.linalg.gram_dtypes)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Statistics:
    """What calibration measured at one linear's input: gram = sum x x^T (in, in), float64 (or float32), and for
    SAES-SVD cross = sum (x_fp - x) x^T, the full-precision stream's offset (None when not asked for)."""

    gram: torch.Tensor
    cross: torch.Tensor | None = None


# the Gram is summed in row blocks of this many channels, each up to the diagonal
GRAM_BLOCK = 512


class GramAccumulator:
    """Streaming sums over the tokens seen, in `dtype` (float64; float32 halves a wide layer's Gram): gram = sum x x^T
    (in, in), the token count, and with `cross` also cross = sum (x_fp - x) x^T, the full-precision stream's offset
    (SAES-SVD's Delta).

    Each batch's product is computed in `product_dtype`: float64 where the smallest eigen-directions matter
    (factorization, compensation); float32, about twice as fast, where damping drowns them anyway (GPTQ), and
    always for a float32 Gram, which then adds each batch's product in place (one GEMM into it, no temporary)."""

    def __init__(self, in_features: int, cross: bool = False, device: torch.device | str = "cpu",
                 product_dtype: torch.dtype = torch.float64, dtype: torch.dtype = torch.float64):
        self.gram = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.cross = torch.zeros_like(self.gram) if cross else None
        self.count = 0
        self.product_dtype = torch.float32 if dtype == torch.float32 else product_dtype

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.gram.device, self.product_dtype)
        # only the blocks on and below the diagonal: `finish` copies them across (a third less work at 1536 wide)
        edges = list(range(0, len(self.gram), GRAM_BLOCK)) + [len(self.gram)]
        for start, stop in zip(edges, edges[1:]):
            self._add(self.gram[start:stop, :stop], x[:, start:stop].T, x[:, :stop])
        if self.cross is not None:
            self._add(self.cross, (x_fp.reshape(x.shape).to(x) - x).T, x)
        self.count += x.shape[0]

    def _add(self, total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        if self.product_dtype == total.dtype:
            total.addmm_(left, right)
        else:
            total += left @ right

    def finish(self) -> Statistics:
        """The statistics, the Gram made exactly symmetric (GEMM sums may differ from their transpose in the last
        bit), which lets the eigensolver use one triangle as its workspace and restore it (compress.linalg.eigh_)."""
        symmetrize_(self.gram)
        return Statistics(self.gram, self.cross)


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
    """Within the block, accumulate the input Gram of each named linear; yields {name: GramAccumulator}, whose
    `gram` is final (symmetrized) once the block ends."""
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


@contextmanager
def swapped(block: nn.Module, modules: dict[str, nn.Module]):
    """Within the context, the block's submodules named in `modules` (names inside the block) are those given."""
    previous = {name: block.get_submodule(name) for name in modules}
    for name, module in modules.items():
        block.set_submodule(name, module)
    try:
        yield
    finally:  # in reverse, so that a module set inside another given one is restored inside it
        for name, module in reversed(previous.items()):
            block.set_submodule(name, module)


class Replays:
    """Outputs of the block's modules that are final (all their linears compressed: the attention once o_proj is,
    gate_proj once it is), recorded per batch on the compressed stream the first time they run and replayed from
    then on: the block's later capture steps and its propagation skip them. Replaying gives the same bits as running
    them again.

    `budget`: bytes the recorded outputs may take; `add(widths)` names more modules as they become final, with
    their output widths, in the order to prefer them: those that would exceed the budget are not replayed, and a
    module inside a replayed one is dropped once the outer one has been recorded (its replays serve that run).
    """

    def __init__(self, tokens: int, budget: float):
        self.tokens, self.left = tokens, budget
        self.outputs: dict[str, dict[int, object]] = {}
        self.widths: dict[str, int] = {}
        self.covered: list[str] = []

    def add(self, widths: dict[str, int]) -> None:
        for inner in self.covered:  # their outer module has been recorded since
            del self.outputs[inner]
            self.left += self.tokens * self.widths.pop(inner) * 4
        self.covered = []
        for name, width in widths.items():
            if name in self.outputs or any(name.startswith(outer + ".") for outer in self.outputs):
                continue
            if self.tokens * width * 4 <= self.left:
                self.covered += [inner for inner in self.outputs if inner.startswith(name + ".")]
                self.outputs[name], self.widths[name] = {}, width
                self.left -= self.tokens * width * 4

    def stand_ins(self, block: nn.Module, start: int) -> dict[str, nn.Module]:
        """{module: a module that replays its output for the batch starting at window `start`, or runs and records
        it}: for `swapped`, around one compressed-stream forward of that batch, inner modules first."""
        names = sorted(self.outputs, key=lambda name: -name.count("."))
        return {name: _Replay(block.get_submodule(name), self.outputs[name], start) for name in names}


class _Replay(nn.Module):
    def __init__(self, module: nn.Module, outputs: dict[int, object], start: int):
        super().__init__()
        self.module, self.outputs, self.start = module, outputs, start

    def forward(self, *args, **kwargs):
        if self.start not in self.outputs:
            self.outputs[self.start] = self.module(*args, **kwargs)
        return self.outputs[self.start]


@torch.no_grad()
def group_statistics(block: nn.Module, groups: list[tuple[str, ...]], hidden: torch.Tensor, block_kwargs: dict,
                     fp_hidden: torch.Tensor | None = None, cross: bool = False, fp_outputs: bool = False,
                     originals: dict[str, nn.Module] | None = None, batch_size: int = 8,
                     product_dtype: torch.dtype = torch.float64, gram_dtypes: dict[str, torch.dtype] | None = None,
                     replays: Replays | None = None) -> tuple[dict[str, Statistics], torch.Tensor | None]:
    """Input statistics of groups of the block's linears (names inside the block), from running the block, batch by
    batch, on the compressed stream `hidden`. The linears of one group read the same tensor (q/k/v, gate/up): they
    share one Statistics, accumulated on the group's first linear.

    With `fp_hidden`, each batch first runs on the full-precision stream, with `originals` ({name: module}, the
    layers of this block already compressed) put back in place: `cross` then adds each group's cross term against
    that stream, and `fp_outputs` returns the block's full-precision outputs (else None); without `cross` it may
    hold only the first windows (outputs for those). A run stops once the last group's input is seen unless its
    output is needed. The streams may live elsewhere (CPU, half precision) than the block: each batch visits the
    block's device. `product_dtype`: see GramAccumulator; `gram_dtypes`: {a group's first linear: the dtype of its
    Gram} where not float64. `replays`: modules replayed on the compressed stream (see Replays).
    """
    device = block_device(block)
    firsts = [group[0] for group in groups]
    accumulators = {first: GramAccumulator(block.get_submodule(first).in_features, cross, device, product_dtype,
                                           (gram_dtypes or {}).get(first, torch.float64)) for first in firsts}
    fp_inputs: dict[str, torch.Tensor] = {}
    phase = {"fp": True}

    def hook(first: str, last: bool):
        def record(_module, args):
            if phase["fp"]:
                if cross:
                    fp_inputs[first] = args[0]
            else:
                accumulators[first].add(args[0], fp_inputs.pop(first, None))
            if last and not (phase["fp"] and fp_outputs):
                raise _Stop
        return record

    handles = [block.get_submodule(first).register_forward_pre_hook(hook(first, first == firsts[-1]))
               for first in firsts]
    outputs = []
    try:
        for start in range(0, len(hidden), batch_size):
            if fp_hidden is not None and start < len(fp_hidden):  # it may hold only the first windows
                phase["fp"] = True
                with swapped(block, originals or {}):
                    out = _through_until_stop(block, fp_hidden[start: start + batch_size], block_kwargs)
                if fp_outputs:
                    outputs.append(out)
            phase["fp"] = False
            with swapped(block, replays.stand_ins(block, start) if replays else {}):
                _through_until_stop(block, hidden[start: start + batch_size], block_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    statistics = {first: accumulator.finish() for first, accumulator in accumulators.items()}
    return ({name: statistics[group[0]] for group in groups for name in group},
            torch.cat(outputs) if fp_outputs else None)


def _through_until_stop(block: nn.Module, batch: torch.Tensor, block_kwargs: dict) -> torch.Tensor | None:
    try:
        return _through(block, batch, block_kwargs)
    except _Stop:
        return None


def block_parameter(block: nn.Module) -> torch.Tensor:
    """A floating parameter of the block of its widest dtype: where and in which dtype it computes (a streamed
    block keeps its linears' weights in 16 bits and computes in its norms' float32)."""
    return max((p for p in block.parameters() if p.is_floating_point()), key=lambda p: p.element_size())


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
def capture_block_inputs(model: nn.Module, first_block: nn.Module,
                         input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
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
def run_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict, batch_size: int = 8,
              replays: Replays | None = None) -> torch.Tensor:
    """The block's outputs for (nsamples, seqlen, hidden) inputs, `batch_size` windows at a time (`replays`: the
    sublayers replayed, see Replays)."""
    outputs = []
    for start in range(0, len(hidden), batch_size):
        with swapped(block, replays.stand_ins(block, start) if replays else {}):
            outputs.append(_through(block, hidden[start: start + batch_size], block_kwargs))
    return torch.cat(outputs)
