"""The native format: safetensors + HF config + tokenizer + compression_config.json + report.json + recipe.yaml.

Writes go to a hidden temporary directory beside `out`, renamed into place only when complete.
Loading checks the format version and each tensor file's size and sha256 before reading it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError
from compress.layer import CompressedLinear
from compress.models import empty_model, fill_model

FORMAT = "compress-native"
FORMAT_VERSION = 1
TENSORS = "model.safetensors"
CONFIG = "compression_config.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CompressError(f"{out} already exists (pass --overwrite to replace it)")


def save_compressed(compressed, out: str | Path, overwrite: bool = False,
                    extras: Callable[[Path], None] | None = None) -> Path:
    """Write a `pipeline.Compressed` to `out` atomically; returns the path.

    extras(directory) may add files (plots, ...) to the output before it is moved into place.
    """
    out = Path(out)
    check_out(out, overwrite)
    model = compressed.model
    storage_dtype = getattr(model.config, "dtype", None) or torch.float16
    storage_dtype = getattr(torch, storage_dtype) if isinstance(storage_dtype, str) else storage_dtype
    layers = [name for name, module in model.named_modules() if isinstance(module, CompressedLinear)]
    compressed_keys = tuple(f"{name}." for name in layers)
    state = {}
    for key, tensor in model.state_dict().items():
        keep = key.startswith(compressed_keys) or not tensor.is_floating_point()
        state[key] = (tensor if keep else tensor.to(storage_dtype)).detach().contiguous().clone()

    with atomic_directory(out, overwrite) as tmp:
        save_file(state, tmp / TENSORS, metadata={"format": "pt"})  # one key: safetensors writes maps in no fixed order
        write_metadata(compressed, tmp, {TENSORS: {"bytes": (tmp / TENSORS).stat().st_size,
                                                   "sha256": sha256(tmp / TENSORS)}})
        if extras is not None:
            extras(tmp)
    return out


def save_streamed(compressed, work: Path, out: Path, files: dict[str, dict], overwrite: bool = False,
                  extras: Callable[[Path], None] | None = None, clean: Callable[[], None] | None = None) -> Path:
    """Finish a streamed run: its tensor files are already in `work`; add the metadata, then move it to `out`.

    clean() removes the run's bookkeeping once the output is complete; if anything before fails, the metadata goes
    and the tensor files and bookkeeping stay, so the run can be resumed."""
    check_out(out, overwrite)
    try:
        write_metadata(compressed, work, files)
        if extras is not None:
            extras(work)
    except BaseException:
        for name in ("config.json", CONFIG):  # not an output yet
            (work / name).unlink(missing_ok=True)
        raise
    if clean is not None:
        clean()
    move_into_place(work, out)
    return out


def move_into_place(directory: Path, out: Path) -> None:
    """Rename a finished directory to `out`, replacing what is there only once the new one is in place."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(directory, out)
        shutil.rmtree(old)
    else:
        os.replace(directory, out)


def write_metadata(compressed, directory: Path, files: dict[str, dict]) -> None:
    """HF config, generation config, tokenizer, compression_config.json (layers, files with sha256), report, recipe."""
    model = compressed.model
    layers = {name: module.spec() for name, module in model.named_modules() if isinstance(module, CompressedLinear)}
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if compressed.tokenizer is not None:
        compressed.tokenizer.save_pretrained(directory)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": compressed.base_model,
              "files": files, "layers": layers, "recipe": compressed.recipe.to_dict()}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (directory / "report.json").write_text(json.dumps(compressed.report, indent=2) + "\n")
    (directory / "recipe.yaml").write_text(compressed.recipe.to_yaml())


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False):
    """A temporary directory beside `out`, moved into its place only when the block completes (else removed)."""
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_native(path: Path) -> bool:
    """Whether `path` holds this format (its compression_config.json; whether it is valid is read_compression_config's
    to say)."""
    return (path / CONFIG).is_file()


def read_compression_config(path: str | Path) -> dict:
    """compression_config.json of a native directory, with its format and version checked."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise CompressError(f"{path} is not a compressed model directory (no {CONFIG})") from None
    except (OSError, ValueError) as exc:
        raise CompressError(f"{path / CONFIG} is corrupt: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CompressError(f"{path / CONFIG} is not a '{FORMAT}' config")
    if config.get("format_version") != FORMAT_VERSION:
        raise CompressError(f"{path} has format version {config.get('format_version')!r}; "
                            f"this version of compress reads version {FORMAT_VERSION}")
    if not isinstance(config.get("files"), dict) or not isinstance(config.get("layers"), dict):
        raise CompressError(f"{path / CONFIG} is corrupt: 'files' or 'layers' is missing")
    for name, meta in config["files"].items():
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            raise CompressError(f"{path / CONFIG} is corrupt: the entry for {name} needs 'bytes' and 'sha256'")
    return config


def verify_files(path: Path, files: dict) -> None:
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CompressError(f"{file} is missing")
        if file.stat().st_size != meta.get("bytes"):
            raise CompressError(f"{file} is truncated or altered: {file.stat().st_size} bytes, "
                                f"expected {meta.get('bytes')}")
        if sha256(file) != meta.get("sha256"):
            raise CompressError(f"{file} is corrupt: its sha256 does not match {CONFIG}")


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A transformers model with CompressedLinear layers from a native directory, in eval mode."""
    path = Path(path)
    config = read_compression_config(path)
    verify_files(path, config["files"])
    try:
        model = empty_model(path, dtype)
        for name, spec in config["layers"].items():
            model.set_submodule(name, empty_layer(spec, f"{path / CONFIG}: the entry for {name}"))
        state = {}
        for name in config["files"]:
            state.update(load_file(path / name))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CompressError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
    compressed_keys = tuple(f"{name}." for name in config["layers"])
    state = {key: t if key.startswith(compressed_keys) or not t.is_floating_point() else t.to(dtype)
             for key, t in state.items()}
    return fill_model(model, state, str(path)).to(device)


def empty_layer(spec: dict, where: str) -> CompressedLinear:
    """The empty layer a compression_config entry describes; refused when the entry is not exactly what the layer
    writes back (unknown or missing keys) or its features and its parts' shapes disagree."""
    layer = CompressedLinear.from_spec(spec)
    base, up, down = layer.base, layer.up, layer.down
    shapes = [base.shape] if base is not None else []
    if up is not None:
        shapes.append((up.shape[0], down.shape[1]))
        if up.shape[1] != down.shape[0]:
            raise CompressError(f"{where} has up {list(up.shape)} and down {list(down.shape)} of different ranks")
    if any(shape != (layer.out_features, layer.in_features) for shape in shapes):
        raise CompressError(f"{where} is ({layer.out_features}, {layer.in_features}), its parts {shapes}")
    if layer.spec() != spec:
        raise CompressError(f"{where} is not a layer this format writes: {json.dumps(spec)[:200]}")
    return layer


def copy_native(source: Path, directory: Path) -> dict:
    """Copy every file, then verify the copy's tensor files against the sizes and sha256 of compression_config."""
    shutil.copytree(source, directory, dirs_exist_ok=True)
    config = read_compression_config(directory)
    verify_files(directory, config["files"])
    return {"files_verified": sorted(config["files"]), "layers": len(config["layers"])}
