"""Export a compressed output for serving: GPTQ + PEFT LoRA adapter, a dense transformers checkpoint, a re-validated
native copy, or an ONNX graph. Every export is written through native.atomic_directory: a failed one leaves nothing.

    gptq    the HF / GPTQModel / vLLM convention (../shared/PEERS.md section 4): qweight, qzeros, scales, g_idx and
            a quantization_config; the low-rank part of `base + up @ down` goes beside it in adapter/ as a PEFT LoRA
            (lora_B @ lora_A = up @ down, lora_alpha = r), its rank zero-padded to one vLLM accepts.
    dense   every layer merged back to W = base + up @ down, saved with save_pretrained (sharded, with an index).
    native  a byte-for-byte copy whose checksums are verified after copying.
    onnx    the dense model through torch.onnx.export, run with onnxruntime and compared with the compressed model.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.adapter import save_lora_adapter
from compress.checkpoints import gptq_tensors
from compress.errors import CompressError
from compress.layer import CompressedLinear, PackedTensor
from compress.native import atomic_directory, check_out, load_compressed, read_compression_config, verify_files
from compress.quantize.rtn import quantize_rtn
from kernels.formats import GPTQ_CHECKPOINT_FORMATS
from kernels.grid import QuantizedWeight, resolve_group_size
from kernels.reference import materialize

FORMATS = ("gptq", "dense", "native", "onnx")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values (above 1)
MARLIN = {(4, True), (8, True)}  # (bits, sym) that vLLM's gptq_marlin kernel serves
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RECORD = "export.json"
ADAPTER = "adapter"


@dataclass(frozen=True)
class ExportOptions:
    """checkpoint_format: GPTQ v1 "gptq" or "gptq_v2". merge_lowrank: GPTQ only, merge layers without a quantized
    base into one weight and requantize it (RTN, merge_bits or the recipe's bits). dtype: storage dtype of dense
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
    """Export the native output `source` to `out` in format `fmt` (one of FORMATS)."""
    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise CompressError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_out(out, overwrite)
    if out.resolve() == source.resolve():
        raise CompressError("--out must differ from the compressed directory being exported")
    config = read_compression_config(source)
    model, tokenizer = load_compressed(source), load_tokenizer(source)
    with atomic_directory(out, overwrite) as tmp:
        if fmt == "native":
            warnings, checks = [], copy_native(source, tmp, config)
        elif fmt == "dense":
            warnings, checks = [], write_dense(merge_layers(model), tokenizer, tmp, storage_dtype(source, options),
                                               options.max_shard_size)
        elif fmt == "onnx":
            warnings, checks = [], write_onnx(model, tokenizer, tmp, options.onnx_tolerance)
        else:
            warnings, checks = write_gptq(model, tokenizer, tmp, config["recipe"], options, adapter_base=str(out.resolve()))
        record = {"format": fmt, "source": str(source.resolve()), "base_model": config.get("base_model"),
                  "options": asdict(options), "warnings": warnings, "checks": checks}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Exported(out, fmt, warnings, checks)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None  # a model saved without its tokenizer still exports


def storage_dtype(source: Path, options: ExportOptions) -> torch.dtype:
    """The dtype dense tensors are written in: the option, else the checkpoint's own (config.json), else fp16."""
    if options.dtype:
        return DTYPES[options.dtype]
    try:
        stored = json.loads((source / "config.json").read_text()).get("dtype")
    except (OSError, ValueError):
        stored = None
    return DTYPES.get(stored, torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# native and dense

def copy_native(source: Path, directory: Path, config: dict) -> dict:
    """Copy every file, then verify the copy's tensor files against the sizes and sha256 of compression_config."""
    shutil.copytree(source, directory, dirs_exist_ok=True)
    (directory / RECORD).unlink(missing_ok=True)
    verify_files(directory, read_compression_config(directory)["files"])
    return {"files_verified": sorted(config["files"]), "layers": len(config["layers"])}


def merge_layers(model: nn.Module) -> nn.Module:
    """Replace every CompressedLinear by an nn.Linear holding W = base + up @ down (in place; returns the model)."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.weight_approx())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        model.set_submodule(name, linear.eval())
    return model


def write_dense(model: nn.Module, tokenizer, directory: Path, dtype: torch.dtype, max_shard_size: str) -> dict:
    """save_pretrained in `dtype`: safetensors shards of at most max_shard_size, with an index when there are several."""
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"dtype": str(dtype).removeprefix("torch."), "shards": len(list(directory.glob("*.safetensors")))}


# ---------------------------------------------------------------------------------------------------------------
# GPTQ + LoRA adapter

@dataclass(frozen=True)
class GPTQLayer:
    """One linear as GPTQ holds it: the quantized base, its bias, and the factors (up, down) left for the adapter."""

    quantized: QuantizedWeight
    bias: torch.Tensor | None
    factors: tuple[torch.Tensor, torch.Tensor] | None
    merged: bool = False


def merge_grid(recipe: dict, options: ExportOptions, widths: set[int]) -> tuple[int, int, bool]:
    """(bits, group_size, symmetric) for requantizing merged layers of input `widths`: the recipe's grid, else 4-bit
    symmetric (Marlin's), with the first of the recipe's group size, 128, 64, 32 that divides every width (else 0: one
    group per row), since a GPTQ config holds one group size."""
    stage = recipe.get("quantize") or {}
    sizes = [stage["group_size"]] if stage.get("group_size") else [128, 64, 32]
    group_size = next((g for g in sizes if all(w % g == 0 for w in widths)), 0)
    return options.merge_bits or stage.get("bits", 4), group_size, stage.get("symmetric", True)


def gptq_layers(model: nn.Module, recipe: dict, options: ExportOptions) -> dict[str, GPTQLayer]:
    """Every CompressedLinear as a GPTQLayer; layers with no quantized base are refused unless merge_lowrank."""
    compressed = {name: layer for name, layer in model.named_modules() if isinstance(layer, CompressedLinear)}
    bits, group_size, symmetric = merge_grid(recipe, options, {layer.in_features for layer in compressed.values()})
    layers, refused = {}, []
    for name, layer in compressed.items():
        bias = None if layer.bias is None else layer.bias.detach()
        if isinstance(layer.base, PackedTensor):
            factors = None
            if layer.up is not None:
                factors = (materialize(layer.up.operand(), torch.float32), materialize(layer.down.operand(), torch.float32))
            layers[name] = GPTQLayer(layer.base.operand(), bias, factors)
        elif options.merge_lowrank:
            weight = layer.weight_approx()
            quantized = quantize_rtn(weight, bits, resolve_group_size(weight.shape[1], group_size), symmetric)
            layers[name] = GPTQLayer(quantized, bias, None, merged=True)
        else:
            refused.append(name)
    if refused:
        kind = "pure low-rank" if model.get_submodule(refused[0]).base is None else "dense (unquantized)"
        raise CompressError(f"{len(refused)} layers have no quantized base that GPTQ can hold ({refused[0]} is {kind}): "
                            f"pass --merge-lowrank to merge and requantize them ({bits}-bit RTN), or use --format dense")
    if not layers:
        raise CompressError("the model has no compressed layers to write as GPTQ")
    return layers


def gptq_config(layers: dict[str, GPTQLayer], recipe: dict, checkpoint_format: str) -> dict:
    """The quantization_config block: one bits / group_size / sym / desc_act for all layers (refused otherwise)."""
    bits = {layer.quantized.bits for layer in layers.values()}
    group_sizes = {-1 if q.group_size >= q.shape[1] else q.group_size for q in (l.quantized for l in layers.values())}
    if len(bits) > 1 or len(group_sizes) > 1:
        raise CompressError(f"layers use bits {sorted(bits)} and group sizes {sorted(group_sizes)}: a GPTQ config holds "
                            "one of each (compress again with a --group-size that divides every layer)")
    stage = recipe.get("quantize") or {}
    return {"quant_method": "gptq", "bits": bits.pop(), "group_size": group_sizes.pop(),
            "sym": all(layer.quantized.symmetric for layer in layers.values()),
            "desc_act": any(layer.quantized.g_idx is not None for layer in layers.values()),
            "static_groups": bool(stage.get("static_groups", False)), "true_sequential": True,
            "damp_percent": stage.get("damp", 0.01), "lm_head": False, "pack_dtype": "int32",
            "checkpoint_format": checkpoint_format, "format": checkpoint_format,
            "meta": {"quantizer": ["compress-llm:0.1.0"], "merged_lowrank_layers": sum(l.merged for l in layers.values())}}


def serving_warnings(config: dict, zero_point_zeros: int) -> list[str]:
    """Where vLLM serves this checkpoint slowly or reads it wrongly (PEERS.md section 4)."""
    bits, sym, group_size, fmt = config["bits"], config["sym"], config["group_size"], config["checkpoint_format"]
    warnings = []
    grid = f"{bits}-bit {'symmetric' if sym else 'asymmetric'}"
    if (bits, sym) not in MARLIN:
        warnings.append(f"{grid} GPTQ misses vLLM's fast Marlin kernel (symmetric 4/8-bit only): it is served by the "
                        "slower gptq_gemm (ExLlama) path; compress with --sym and --wbits 4 or 8 for the fast path")
    elif group_size not in MARLIN_GROUP_SIZES:
        warnings.append(f"group size {group_size} is not one Marlin supports (-1, 32, 64, 128): vLLM falls back to "
                        "the slower gptq_gemm path")
    if fmt == "gptq_v2" and (not sym or bits == 2):
        warnings.append(f"vLLM's gptq_gemm path hard-codes the v1 zero offset and mis-reads {grid} gptq_v2 "
                        "checkpoints (gibberish, vllm#26343): keep the default v1 'gptq' for vLLM")
    if zero_point_zeros:
        warnings.append(f"{zero_point_zeros} groups have zero point 0, which v1 'gptq' stores as {2**bits - 1} (z - 1 "
                        f"wraps): GPTQModel reads it back exactly, loaders that add 1 without wrapping read {2**bits}; "
                        "use --checkpoint-format gptq_v2 for GPTQModel/transformers or compress with --sym")
    if config["desc_act"]:
        warnings.append("act-order (desc_act): vLLM replicates scales and zeros of row-parallel layers on every "
                        "tensor-parallel rank")
    return warnings


def lora_rank(ranks: set[int]) -> int:
    """The smallest rank vLLM accepts that holds every layer's factors (the largest rank itself above 512)."""
    largest = max(ranks)
    return next((r for r in VLLM_LORA_RANKS if r >= largest), largest)


def pad_factors(up: torch.Tensor, down: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up (out, r), down (r, in) zero-padded to `rank`: up @ down is unchanged."""
    extra = rank - down.shape[0]
    return (torch.cat([up, up.new_zeros(up.shape[0], extra)], 1), torch.cat([down, down.new_zeros(extra, down.shape[1])]))


def write_gptq(model: nn.Module, tokenizer, directory: Path, recipe: dict, options: ExportOptions,
               adapter_base: str) -> tuple[list[str], dict]:
    """The GPTQ checkpoint (safetensors shards, config.json + quantize_config.json) and adapter/ when there are factors."""
    from huggingface_hub import save_torch_state_dict

    layers = gptq_layers(model, recipe, options)
    config = gptq_config(layers, recipe, options.checkpoint_format)
    plain = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not model.get_output_embeddings()]
    if plain:  # layers the recipe left out stay fp16; GPTQModel's `dynamic` "-:" entries tell loaders to skip them
        config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in plain}
    state = gptq_state(model, layers, options.checkpoint_format)
    save_torch_state_dict(state, directory, max_shard_size=options.max_shard_size, metadata={"format": "pt"})
    model.config.dtype = torch.float16
    model.config.save_pretrained(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf_config, "quantization_config": config}, indent=2) + "\n")
    (directory / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)

    zero_point_zeros = 0
    if options.checkpoint_format == "gptq" and not config["sym"]:
        zero_point_zeros = sum(int((layer.quantized.zeros() == 0).sum()) for layer in layers.values())
    warnings = serving_warnings(config, zero_point_zeros)
    if plain:
        warnings.append(f"{len(plain)} linear layers the recipe left out (e.g. {plain[0]}) stay fp16, marked as skipped "
                        "in quantization_config.dynamic; vLLM cannot serve a fused qkv/gate_up layer that mixes both")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        warnings.append(f"{len(merged)} layers merged to base + up @ down and requantized ({config['bits']}-bit RTN): "
                        "their outputs differ from the compressed model's")
    checks = {"layers": len(layers), "merged_layers": len(merged), **{k: config[k] for k in ("bits", "group_size", "sym")}}
    factors = {name: layer.factors for name, layer in layers.items() if layer.factors is not None}
    if factors:
        rank = lora_rank({down.shape[0] for _, down in factors.values()})
        if rank > VLLM_LORA_RANKS[-1]:
            warnings.append(f"LoRA rank {rank} is above vLLM's largest max_lora_rank (512)")
        save_lora_adapter({name: pad_factors(*f, rank) for name, f in factors.items()}, adapter_base, directory / ADAPTER)
        checks.update(adapter_layers=len(factors), adapter_rank=rank,
                      factor_ranks=sorted({down.shape[0] for _, down in factors.values()}))
    return warnings, checks


def gptq_state(model: nn.Module, layers: dict[str, GPTQLayer], checkpoint_format: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: GPTQ tensors (+ fp16 bias) per layer, the rest of the model in fp16."""
    prefixes = tuple(f"{name}." for name in layers)
    state = {key: (t.half() if t.is_floating_point() else t).contiguous() for key, t in model.state_dict().items()
             if not key.startswith(prefixes)}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for name, layer in layers.items():
        try:
            state.update(gptq_tensors(name, layer.quantized, checkpoint_format))
        except ValueError as exc:
            raise CompressError(f"{name} cannot be packed as GPTQ: {exc}") from None
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.half().contiguous()
    return state


# ---------------------------------------------------------------------------------------------------------------
# ONNX

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
        raise CompressError("onnx export needs onnx, onnxscript and onnxruntime: pip install 'compress-llm[onnx]'") from None
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
