"""Streaming: a checkpoint compressed block by block from its safetensors shards, each finished block checkpointed.

Only one decoder block's weights (one CBQ window's) are in memory at a time: the model is built on the meta device,
a block is filled from the shards when the loop reaches it and emptied once its compressed tensors are on disk.
The work directory `.OUT.partial` holds one safetensors file and one record per finished block, and the two
activation streams after the last of them; a resumed run continues from there and writes the same files as a run
that was never stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from compress import models
from compress.errors import CompressError
from compress.formats.native import sha256

INDEX = "model.safetensors.index.json"
RUN = "run.json"
START_OVER = "run without --resume but with --overwrite to start over"
HALF_DTYPES = (torch.float16, torch.bfloat16)


class Shards:
    """The tensors of a safetensors checkpoint (one model.safetensors, or shards with an index), read by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index, single = self.directory / INDEX, self.directory / "model.safetensors"
        if index.is_file():
            try:
                self.files = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CompressError(f"{index} is corrupt ({type(exc).__name__}: {exc})") from None
            missing = sorted({file for file in self.files.values() if not (self.directory / file).is_file()})
            if missing:
                raise CompressError(f"{self.directory} lacks shards its index names (an incomplete download?): "
                                    f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        elif single.is_file():
            with safe_open(single, "pt") as handle:
                self.files = {key: single.name for key in handle.keys()}
        else:
            raise CompressError(f"{self.directory} has no safetensors weights (model.safetensors or {INDEX})")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once and closed after: mapped pages of shards read earlier do not
        stay in the process's resident memory."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(self.directory / file, "pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in keys})
        return tensors

    def fill(self, module: nn.Module, prefix: str, dtype: torch.dtype, device: torch.device | str,
             keys: list[str] | None = None, stored: frozenset[str] = frozenset()) -> None:
        """Give the (meta) parameters and persistent buffers of `module` (or only `keys`) their tensors
        `prefix.key` from the shards, in `dtype`; those in `stored` stay as stored when that is 16-bit."""
        from accelerate.utils import set_module_tensor_to_device

        keys = list(module.state_dict()) if keys is None else keys
        tensors = self.read([f"{prefix}{key}" for key in keys])
        for key in keys:
            tensor = tensors.pop(f"{prefix}{key}")
            cast = tensor.dtype if key in stored and tensor.dtype in HALF_DTYPES else dtype
            set_module_tensor_to_device(module, key, device, value=tensor,
                                        dtype=cast if tensor.is_floating_point() else None)


def has_shards(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / INDEX).is_file() or (directory / "model.safetensors").is_file()


def empty_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """compress.models.empty_model of the checkpoint, in eval mode, with the checkpoint's stored dtype (outputs keep
    it, as compress.models.load_model does), its generation config and its name."""
    from transformers import AutoConfig, GenerationConfig

    model = models.empty_model(directory, dtype)
    model.config.dtype = AutoConfig.from_pretrained(directory).dtype or dtype
    if (Path(directory) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.name_or_path = str(directory)
    return model.eval()


def fingerprint(model: str, recipe: dict, input_ids: torch.Tensor, blocks: int, device: torch.device,
                activation_dtype: torch.dtype, world_size: int = 1) -> dict:
    """What must match for a run to resume another and write the same files: model, recipe, calibration tokens (this
    rank's), block count, torch, the kind of device, the activations' dtype (--offload) and the world size."""
    tokens = hashlib.sha256(input_ids.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"model": model, "recipe": recipe, "calibration_sha256": tokens, "blocks": blocks,
            "torch": torch.__version__, "device": device.type,
            "activations": str(activation_dtype).removeprefix("torch."), "world_size": world_size}


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def work_directory(out: Path) -> Path:
    """Where a streamed run into `out` keeps its finished blocks until the output is complete."""
    return out.parent / f".{out.name}.partial"


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


@dataclass
class Checkpoints:
    """The work directory of one streaming run. A block counts as finished once its record exists: the record is
    written last, after the block's tensors and the streams, each of those first to a temporary name."""

    work: Path
    blocks: int
    keep: int = 1  # generations of streams kept: 2 under torchrun, where a rank may have finished one block more

    @classmethod
    def open(cls, work: Path, run: dict, resume: bool, overwrite: bool, keep: int = 1) -> "Checkpoints":
        if work.exists() and not resume:
            if not overwrite:
                raise CompressError(f"an interrupted run left {work}: pass --resume to continue it, "
                                    "or --overwrite to start over")
            shutil.rmtree(work)
        run = json.loads(json.dumps(run))  # as it reads back: tuples become lists
        if work.exists():
            saved = json.loads((work / RUN).read_text()) if (work / RUN).is_file() else None
            if saved != run:
                differ = (["its run.json is missing"] if saved is None
                          else [key for key in run if saved.get(key) != run[key]])
                raise CompressError(f"cannot resume: {work} was made by a different run ({', '.join(differ)} "
                                    f"differ; --offload and --device count); {START_OVER}")
        else:
            work.mkdir(parents=True)
            write_atomic(work / RUN, lambda tmp: tmp.write_text(json.dumps(run, indent=2) + "\n"))
        return cls(work, run["blocks"], keep)

    def finished(self) -> int:
        """How many blocks, from the first, are finished."""
        count = 0
        while count < self.blocks and (self.work / f"block-{count:05d}.json").is_file():
            count += 1
        return count

    def verify(self, count: int) -> None:
        """Check the tensor files of the first `count` finished blocks against their records (size and sha256)."""
        for index in range(count):
            for name, entry in self.record(index)["file"].items():
                path = self.work / name
                if not path.is_file() or file_entry(path) != entry:
                    raise CompressError(f"cannot resume: {path} does not match its record (damaged after a crash?); "
                                        f"{START_OVER}")

    def record(self, index: int) -> dict:
        return json.loads((self.work / f"block-{index:05d}.json").read_text())

    def streams(self, index: int) -> dict[str, torch.Tensor]:
        """What the run carries past block `index`: the compressed and full-precision streams ("hidden",
        "fp_hidden") and any learned weights of later blocks ("pending.*")."""
        return load_file(self.work / f"streams-{index:05d}.safetensors")

    def save(self, index: int, tensors: dict[str, torch.Tensor], record: dict,
             carried: dict[str, torch.Tensor]) -> None:
        name = shard_name(index, self.blocks + 1)
        write_atomic(self.work / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        carried = {key: tensor.contiguous() for key, tensor in carried.items()}
        write_atomic(self.work / f"streams-{index:05d}.safetensors", lambda tmp: save_file(carried, tmp))
        record = {**record, "file": {name: file_entry(self.work / name)}}
        write_atomic(self.work / f"block-{index:05d}.json",
                     lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
        (self.work / f"streams-{index - self.keep:05d}.safetensors").unlink(missing_ok=True)

    def clean(self) -> None:
        """Remove the bookkeeping, leaving only the output files. run.json goes first: a run stopped halfway
        through is then refused on --resume, never resumed from records whose streams are gone."""
        (self.work / RUN).unlink()
        for path in self.work.glob("*"):
            if path.name.startswith(("block-", "streams-")):
                path.unlink()


def write_atomic(path: Path, write) -> None:
    """write(tmp) to a temporary name, flushed to the disk, then renamed: after a crash `path` is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
