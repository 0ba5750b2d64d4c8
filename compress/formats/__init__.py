"""Every checkpoint format this tool reads or writes, one module each, and the entry points over them.

    native              this tool's output: CompressedLinear layers as computed (read, written)
    gptq                AutoGPTQ / GPTQModel / transformers / vLLM GPTQ checkpoints (read, written)
    compressed_tensors  llm-compressor's pack-quantized checkpoints (read, written)
    lora                PEFT LoRA adapters, the low-rank part beside a quantized checkpoint (read, written)
    dense               a plain transformers checkpoint with every layer merged (written)
    gguf                llama.cpp's GGUF, the integers carried over where its block formats hold them (written)
    onnx                an ONNX graph of the merged model, checked with onnxruntime (written)

`export` writes a native output in a serving format (FORMATS); `read_quantized` dequantizes a GPTQ or pack-quantized
checkpoint exactly; `load_any` loads every directory this tool reads or writes as a model in memory, with the factors
of an adapter/ beside the weights added.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from compress.errors import CompressError
from compress.formats import native
from compress.formats.compressed_tensors import QUANTIZED_TENSORS as CT_TENSORS
from compress.formats.compressed_tensors import read_pack_quantized, write_compressed_tensors
from compress.formats.dense import DTYPES, merge_layers, storage_dtype, write_dense
from compress.formats.gguf import write_gguf
from compress.formats.gptq import GPTQ_CHECKPOINT_FORMATS, read_gptq, write_gptq
from compress.formats.gptq import QUANTIZED_TENSORS as GPTQ_TENSORS
from compress.formats.lora import ADAPTER, add_factors, read_lora_adapter
from compress.formats.native import atomic_directory, check_out, load_compressed
from compress.formats.onnx import write_onnx
from compress.layer import CompressedLinear
from compress.models import empty_model, fill_model, load_model

FORMATS = ("gptq", "compressed-tensors", "gguf", "dense", "native", "onnx")
RECORD = "export.json"


# ---------------------------------------------------------------------------------------------------------------
# Export

@dataclass(frozen=True)
class ExportOptions:
    """checkpoint_format: GPTQ v1 "gptq" or "gptq_v2". merge_lowrank: GPTQ/compressed-tensors: merge layers without a
    quantized base into one weight and requantize it (RTN, merge_bits or the recipe's bits); GGUF: merge every layer
    with factors and requantize it to Q8_0. dtype: storage dtype of dense
    tensors (None: the checkpoint's own, fp16 for GPTQ). onnx_tolerance: largest |logit difference| / max |logit|."""

    checkpoint_format: str = "gptq"
    merge_lowrank: bool = False
    merge_bits: int | None = None
    dtype: str | None = None
    max_shard_size: str = "5GB"
    onnx_tolerance: float = 1e-3

    def __post_init__(self):
        if self.checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
            raise CompressError(f"checkpoint format must be one of {', '.join(GPTQ_CHECKPOINT_FORMATS)}, "
                                f"got {self.checkpoint_format!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise CompressError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.merge_bits is not None and self.merge_bits not in (2, 3, 4, 8):
            raise CompressError(f"merge bits must be 2, 3, 4 or 8, got {self.merge_bits}")


@dataclass(frozen=True)
class Exported:
    """What an export wrote and found: warnings about serving paths, and the checks it ran."""

    path: Path
    format: str
    warnings: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)


def export(source: str | Path, fmt: str, out: str | Path, options: ExportOptions = ExportOptions(),
           overwrite: bool = False) -> Exported:
    """Export the native output `source` to `out` in format `fmt` (one of FORMATS), written through
    native.atomic_directory: a failed export leaves nothing.

    gptq    qweight, qzeros, scales, g_idx and a quantization_config; the low-rank part of `base + up @ down` beside
            it in adapter/ as a PEFT LoRA (lora_B @ lora_A = up @ down, lora_alpha = r), its rank zero-padded to one
            vLLM accepts.
    compressed-tensors  llm-compressor's pack-quantized format (what vLLM serves), the integers carried over, one
            config group per grid; the low-rank part in adapter/ as for gptq.
    dense   every layer merged back to W = base + up @ down, saved with save_pretrained (sharded, with an index).
    native  a byte-for-byte copy whose checksums are verified after copying.
    onnx    the dense model through torch.onnx.export, run with onnxruntime and compared with the compressed model.
    """
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise CompressError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_out(out, overwrite)
    if out.resolve() == source.resolve():
        raise CompressError("--out must differ from the compressed directory being exported")
    config = native.read_compression_config(source)
    model, tokenizer = load_compressed(source), load_tokenizer(source)
    with atomic_directory(out, overwrite) as tmp:
        if fmt == "native":
            warnings, checks = [], native.copy_native(source, tmp)
        elif fmt == "dense":
            dtype = storage_dtype(source, options.dtype)
            warnings, checks = [], write_dense(merge_layers(model), tokenizer, tmp, dtype, options.max_shard_size)
        elif fmt == "onnx":
            warnings, checks = [], write_onnx(model, tokenizer, tmp, options.onnx_tolerance)
        elif fmt == "gguf":
            warnings, checks = write_gguf(model, tokenizer, tmp, options)
        else:
            writer = write_gptq if fmt == "gptq" else write_compressed_tensors
            warnings, checks = writer(model, tokenizer, tmp, config["recipe"], options, adapter_base=str(out.resolve()))
        record = {"format": fmt, "source": str(source.resolve()), "base_model": config.get("base_model"),
                  "options": asdict(options), "warnings": warnings, "checks": checks}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Exported(out, fmt, warnings, checks)


def load_tokenizer(path: Path):
    """The tokenizer saved in `path`, or None when there is none (a model saved without it still exports)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Reading: which format a directory holds, and its weights

@dataclass(frozen=True)
class QuantizedCheckpoint:
    """Another tool's quantized checkpoint, read: `weights` {module name: dequantized weight (out, in) float32} and
    `others`, every tensor that is not part of a quantized linear (embeddings, norms, biases, linears left out)."""

    format: str
    weights: dict[str, torch.Tensor]
    others: dict[str, torch.Tensor]


def quantization_config(path: Path) -> dict | None:
    """config.json's quantization_config, or None when the directory holds no quantized transformers checkpoint."""
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CompressError(f"cannot read {path / 'config.json'}: {exc}") from None
    return config.get("quantization_config") if isinstance(config, dict) else None


def detect_format(path: str | Path) -> str:
    """'compress-native', 'gptq (gptq)', 'gptq (gptq_v2)' or 'compressed-tensors pack-quantized'; a one-line
    CompressError for a directory that holds none of them."""
    path = Path(path)
    if native.is_native(path):
        return "compress-native"
    config = quantization_config(path)
    if config is None:
        raise CompressError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)")
    method = config.get("quant_method")
    if method == "gptq":
        return f"gptq ({config.get('checkpoint_format', 'gptq')})"
    if method == "compressed-tensors" and config.get("format") == "pack-quantized":
        return "compressed-tensors pack-quantized"
    raise CompressError(f"{path}: unsupported quantization '{method}' (format {config.get('format')!r}); "
                        "supported: gptq, compressed-tensors pack-quantized")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in `path`."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressError(f"no .safetensors files in {path}")
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CompressError(f"cannot read {file}: {exc}") from None
    return tensors


def read_quantized(path: str | Path) -> QuantizedCheckpoint:
    """A GPTQ (v1, v2, act-order) or compressed-tensors pack-quantized checkpoint, dequantized exactly."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "compress-native":
        raise CompressError(f"{path} is this tool's native output: load it with load_compressed")
    config = quantization_config(path)
    gptq = config["quant_method"] == "gptq"
    tensors = read_tensors(path)
    try:
        weights = read_gptq(tensors, config) if gptq else read_pack_quantized(tensors, config)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CompressError(f"{path}: the quantized tensors do not follow the {config['quant_method']} convention: "
                            f"{exc}") from None
    consumed = {f"{name}.{suffix}" for name in weights for suffix in (GPTQ_TENSORS if gptq else CT_TENSORS)}
    return QuantizedCheckpoint(fmt, weights, {key: t for key, t in tensors.items() if key not in consumed})


def dequantized_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """{module name: weight (out, in) float32} of every quantized (native: compressed) linear in `path`."""
    if native.is_native(Path(path)):
        model = load_compressed(path)
        return {name: m.weight_approx() for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    return read_quantized(path).weights


def recorded_original(path: str | Path) -> str | None:
    """The full-precision model this tool's output in `path` came from: a native output's base_model, or that of
    an export (export.json); None for other tools' checkpoints."""
    path = Path(path)
    if native.is_native(path):
        return native.read_compression_config(path).get("base_model") or None
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return record.get("base_model") or None


# ---------------------------------------------------------------------------------------------------------------
# Loading any of them as a model in memory

def load_any(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode for every directory this tool reads or writes, or a model name.

    A native output loads with its CompressedLinear layers; a GPTQ or pack-quantized checkpoint as the model of its
    config.json with every quantized linear's weight dequantized (no GPU library needed); anything else (a plain
    transformers directory, an alias, a hub id) through transformers. An adapter/ directory beside the weights (from
    `compress compensate` or `compress export --format gptq`) adds scaling * lora_B @ lora_A to its layers.
    """
    directory = Path(path)
    if native.is_native(directory):
        model, tokenizer = load_compressed(directory, dtype), tokenizer_of(directory)
    elif directory.is_dir() and quantization_config(directory) is not None:
        model, tokenizer = dequantized_model(directory, dtype), tokenizer_of(directory)
    else:
        model, tokenizer, _ = load_model(str(path), dtype)
    if directory.is_dir() and (directory / ADAPTER).is_dir():
        add_factors(model, read_lora_adapter(directory / ADAPTER))
    return model, tokenizer


def tokenizer_of(path: Path):
    """The tokenizer saved in `path`; a one-line CompressError without one (evaluation needs it)."""
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise CompressError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return tokenizer


def dequantized_model(path: Path, dtype: torch.dtype = torch.float32):
    """The model of path/config.json built on the meta device and filled from the checkpoint: each quantized linear's
    weight dequantized, every other tensor as stored (floats cast to `dtype`)."""
    checkpoint = read_quantized(path)
    try:
        model = empty_model(path, dtype)
    except (OSError, ValueError) as exc:
        raise CompressError(f"cannot build the model of {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in checkpoint.others.items()}
    state.update({f"{name}.weight": weight.to(dtype) for name, weight in checkpoint.weights.items()})
    modules = dict(model.named_modules())
    for name in checkpoint.weights:  # AutoGPTQ writes a zero bias for every quantized linear, with or without one
        bias = state.get(f"{name}.bias")
        if bias is not None and name in modules and modules[name].bias is None and not bias.any():
            del state[f"{name}.bias"]
    return fill_model(model, state, str(path))
