"""Where the block loop's decoder blocks come from, behind one interface: a model in memory, or a checkpoint's
shards streamed block by block with a checkpoint after each (compress.streaming), which a later run resumes.

The loop calls, in order: start (the first block's calibration inputs, or the streams an interrupted run carried),
then per block load (fill the blocks it is about to use), finish (checkpoint and free it) or, for a block an
interrupted run finished, restore.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from calibration import capture_block_inputs
from compress.architectures import Architecture
from compress.distributed import World, least
from compress.layer import CompressedLinear
from compress.streaming import (HALF_DTYPES, Checkpoints, Shards, file_entry, fingerprint, shard_name,
                               write_atomic)
from kernels.grid import QuantizedWeight


@dataclass
class Start:
    """Where the loop starts: the first block not yet finished, the compressed and full-precision streams at its
    input, the keyword arguments every block receives (RoPE, mask), and weights learned for later blocks."""

    resumed: int
    hidden: torch.Tensor
    fp_hidden: torch.Tensor
    block_kwargs: dict
    pending: dict[int, dict[str, QuantizedWeight]]


class InMemoryBlocks:
    """The blocks of a model already in memory: nothing to fill, nothing to checkpoint, nothing to resume."""

    def weight(self, model: nn.Module, name: str) -> torch.Tensor:
        return model.get_submodule(name).weight.detach()

    def start(self, model: nn.Module, arch: Architecture, input_ids: torch.Tensor, recipe) -> Start:
        hidden, block_kwargs = self.block_inputs(model, arch, input_ids)
        return Start(0, hidden, hidden, block_kwargs, {})

    def block_inputs(self, model: nn.Module, arch: Architecture, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The first block's inputs for `input_ids`, and the keyword arguments every block receives."""
        return capture_block_inputs(model, model.get_submodule(arch.blocks)[0], input_ids)

    def head(self, model: nn.Module, arch: Architecture):
        """A context in which the final norm and the head hold their weights."""
        return nullcontext()

    def load(self, model: nn.Module, arch: Architecture, indices: range) -> None:
        pass

    def unload(self, model: nn.Module, arch: Architecture, index: int) -> None:
        """Free a block used without compressing it (the --bpw plan's passes)."""

    def finish(self, model: nn.Module, arch: Architecture, index: int, record: dict, hidden: torch.Tensor,
               fp_hidden: torch.Tensor, pending: dict[int, dict[str, QuantizedWeight]]) -> None:
        pass

    def restore(self, model: nn.Module, index: int) -> dict:
        raise RuntimeError("a model in memory has no finished blocks to restore")


class StoredLinear(nn.Linear):
    """A linear whose weight stays in the checkpoint's 16-bit dtype and computes in its input's: the upcast is exact,
    so the numbers are those of a float32 copy, at half its memory (a 405B block: 5.9 GiB instead of 11.9)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


class StreamedBlocks:
    """The blocks of a safetensors checkpoint on an empty (meta) model: each filled from the shards before the loop
    uses it, and once compressed written to the work directory `work` with the streams and freed."""

    def __init__(self, shards: Shards, work: Path, device: torch.device | str = "cpu",
                 activation_dtype: torch.dtype = torch.float32, storage_dtype: torch.dtype = torch.float16,
                 resume: bool = False, overwrite: bool = False, world: World = World()):
        self.shards, self.work, self.device = shards, work, torch.device(device)
        self.activation_dtype, self.storage_dtype = activation_dtype, storage_dtype
        self.resume, self.overwrite, self.world = resume, overwrite, world
        self.checkpoints: Checkpoints | None = None

    def weight(self, model: nn.Module, name: str) -> torch.Tensor:
        return self.shards.get(f"{name}.weight")

    def start(self, model: nn.Module, arch: Architecture, input_ids: torch.Tensor, recipe) -> Start:
        """Open the work directory; the streams at the first block, or at the first one an interrupted run left."""
        from accelerate.utils import send_to_device

        blocks = model.get_submodule(arch.blocks)
        run = fingerprint(str(self.shards.directory), recipe.to_dict(), input_ids, len(blocks), self.device,
                          self.activation_dtype, self.world.size)
        self.checkpoints = Checkpoints.open(self.work, run, self.resume, self.overwrite,
                                            keep=1 if self.world.size == 1 else 2)
        resumed = least(self.checkpoints.finished(), self.world)  # a rank may be one block ahead of another
        self.checkpoints.verify(resumed)
        # A resumed run needs only the blocks' keyword arguments (RoPE, mask): one window gives them.
        hidden, block_kwargs = self.block_inputs(model, arch, input_ids[:1] if resumed else input_ids)
        hidden, block_kwargs = hidden.to("cpu", self.activation_dtype), send_to_device(block_kwargs, self.device)
        if resumed:
            hidden, fp_hidden, pending = self.carried(resumed - 1)
            return Start(resumed, hidden, fp_hidden, block_kwargs, pending)
        return Start(0, hidden, hidden, block_kwargs, {})

    def block_inputs(self, model: nn.Module, arch: Architecture, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The first block's inputs for `input_ids` (on the compute device), and the blocks' keyword arguments."""
        outside = self.fill_outside(model, arch)
        try:
            return capture_block_inputs(model, model.get_submodule(arch.blocks)[0], input_ids.to(self.device))
        finally:
            self.release(model, outside)

    @contextmanager
    def head(self, model: nn.Module, arch: Architecture):
        """A context in which the final norm and the head hold their weights (a tied head: the embeddings')."""
        keys = [key for key in model.state_dict() if key.startswith((f"{arch.norm}.", f"{arch.head}.",
                                                                    f"{arch.embeddings}.")) and key in self.shards]
        self.shards.fill(model, "", torch.float32, self.device, keys)
        try:
            yield
        finally:
            self.release(model, keys)

    def unload(self, model: nn.Module, arch: Architecture, index: int) -> None:
        """Free a block used without compressing it (the --bpw plan's passes)."""
        model.get_submodule(arch.blocks)[index].to("meta")

    def fill_outside(self, model: nn.Module, arch: Architecture) -> list[str]:
        """Fill what runs before the blocks (embeddings); the output head stays on meta. Returns the keys filled."""
        from accelerate.utils import set_module_tensor_to_device

        outside = [key for key in model.state_dict() if not key.startswith((f"{arch.blocks}.", f"{arch.head}."))
                   and key in self.shards]
        self.shards.fill(model, "", torch.float32, self.device, outside)
        for name, buffer in model.named_buffers():  # RoPE's frequencies: not in the shards, made on the CPU
            if not name.startswith(f"{arch.blocks}.") and not buffer.is_meta:
                set_module_tensor_to_device(model, name, self.device)
        return outside

    def release(self, model: nn.Module, keys: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for key in keys:
            set_module_tensor_to_device(model, key, "meta")

    def load(self, model: nn.Module, arch: Architecture, indices: range) -> None:
        """Fill the blocks: the linears' weights as stored when 16-bit (StoredLinear), the rest in float32."""
        blocks = model.get_submodule(arch.blocks)
        for index in indices:
            block = blocks[index]
            if not any(t.is_meta for t in block.state_dict().values()):
                continue
            linears = {name: module for name, module in block.named_modules() if type(module) in (nn.Linear,
                                                                                                   StoredLinear)}
            self.shards.fill(block, f"{arch.blocks}.{index}.", torch.float32, self.device,
                             stored=frozenset(f"{name}.weight" for name in linears))
            for module in linears.values():
                module.__class__ = StoredLinear if module.weight.dtype in HALF_DTYPES else nn.Linear

    def finish(self, model: nn.Module, arch: Architecture, index: int, record: dict, hidden: torch.Tensor,
               fp_hidden: torch.Tensor, pending: dict[int, dict[str, QuantizedWeight]]) -> None:
        """Write the finished block (compressed layers as they are, the rest in the storage dtype) and free it,
        with the streams and `pending`: weights of later blocks already learned (a CBQ window),
        {block: {name: weight}}."""
        prefix = f"{arch.blocks}.{index}"
        block = model.get_submodule(prefix)
        compressed = {f"{prefix}.{name}": module for name, module in block.named_modules()
                      if isinstance(module, CompressedLinear)}
        keep = tuple(f"{name}." for name in compressed)
        tensors = {}
        for key, tensor in block.state_dict().items():
            key = f"{prefix}.{key}"
            cast = tensor.is_floating_point() and not key.startswith(keep)
            tensors[key] = (tensor.to(self.storage_dtype) if cast else tensor).detach().cpu().contiguous()
        carried = {"hidden": hidden, "fp_hidden": fp_hidden}
        specs = {}
        for later, layers in pending.items():
            for name, quantized in layers.items():
                specs.setdefault(str(later), {})[name] = {"bits": quantized.bits, "group_size": quantized.group_size,
                                                          "shape": list(quantized.shape)}
                carried.update({f"pending.{later}.{name}.{key}": t for key, t in quantized.tensors().items()})
        record = {**record, "specs": {name: module.spec() for name, module in compressed.items()}, "pending": specs}
        if not self.world.main:  # every rank holds the same block: rank 0 writes it, the others only their streams
            tensors = {}
        self.checkpoints.save(index, tensors, record, carried)
        block.to("meta")

    def carried(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[int, dict[str, QuantizedWeight]]]:
        """What an interrupted run carried past its last finished block `index`: (hidden, fp_hidden, pending)."""
        tensors = self.checkpoints.streams(index)
        pending: dict[int, dict[str, QuantizedWeight]] = {}
        for later, layers in self.checkpoints.record(index).get("pending", {}).items():
            for name, spec in layers.items():
                key = f"pending.{later}.{name}."
                pending.setdefault(int(later), {})[name] = QuantizedWeight(
                    tensors[key + "qweight"], tensors[key + "scales"], tensors.get(key + "qzeros"), spec["bits"],
                    spec["group_size"], tuple(spec["shape"]), tensors.get(key + "g_idx"))
        return tensors["hidden"], tensors["fp_hidden"], pending

    def restore(self, model: nn.Module, index: int) -> dict:
        """A block finished by an earlier run: its record, and its compressed layers' shapes put on meta."""
        record = self.checkpoints.record(index)
        with torch.device("meta"):
            for name, spec in record["specs"].items():
                model.set_submodule(name, CompressedLinear.from_spec(spec))
        if record["intermediate_size"]:
            model.config.intermediate_size = record["intermediate_size"]
        return record

    def write_outside(self, model: nn.Module, arch: Architecture) -> dict[str, dict]:
        """The tensors outside the blocks (embeddings, final norm, head), straight from the shards in the storage
        dtype, as the last shard; returns every shard's file entry."""
        blocks = self.checkpoints.blocks
        name = shard_name(blocks, blocks + 1)
        keys = [key for key in model.state_dict() if not key.startswith(f"{arch.blocks}.") and key in self.shards]
        tensors = {key: (t.to(self.storage_dtype) if t.is_floating_point() else t).contiguous()
                   for key, t in self.shards.read(keys).items()}
        write_atomic(self.work / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        files = {}
        for index in range(blocks):
            files.update(self.checkpoints.record(index)["file"])
        files[name] = file_entry(self.work / name)
        return files
