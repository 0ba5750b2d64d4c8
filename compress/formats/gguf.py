"""llama.cpp's GGUF, written with the `gguf` package (llama.cpp's own Python writer and reader).

GGUF quantizes each row in blocks of 32 columns, one fp16 scale per block, so a group of 32k columns (no g_idx) is
k blocks that share its scale, and a layer whose grid is one of GGUF's block formats keeps its integers bit for bit:

    symmetric, 2-4 bits    Q4_0   d = scale, q' = q - zero + 8            (llama.cpp reads d (q' - 8))
    asymmetric, 2-4 bits   Q4_1   d = scale, m = -scale * zero in fp16    (llama.cpp reads d q + m)
    symmetric, 8 bits      Q8_0   d = scale, q' = q - 128                 (llama.cpp reads d q')

So the choices of GPTQ or learned rounding survive; only Q4_1's offset m is rounded to fp16 (a 2^-11 relative
error of the group's offset). 2- and 3-bit integers sit in 4-bit fields: exact, though not smaller; GGUF's 2/3-bit
k-quants share 6-bit sub-scales that cannot hold this tool's per-group scales. Any other quantized layer
(asymmetric 8 bits, act-order g_idx, groups not a multiple of 32) is re-quantized to Q8_0 with a warning naming it.
Layers with low-rank factors are refused unless merge_lowrank: base + up @ down merged, then re-quantized to Q8_0.

llama.cpp's "llama" architecture (Llama, Mistral) only. Its rotary embedding pairs neighbouring dimensions where
transformers pairs the two halves of a head, so the rows of q_proj and k_proj are permuted head by head, as
llama.cpp's converter does (a row permutation: the integers of each row move whole).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import CompressError
from compress.layer import CompressedLinear
from kernels.grid import QuantizedWeight

FILE = "model.gguf"
BLOCK = 32  # columns per GGUF block
LLAMA_TYPES = ("llama", "mistral")  # transformers model types that llama.cpp runs as its "llama" architecture
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def block_bytes(quantized: QuantizedWeight):
    """(GGML type, (rows, blocks * block bytes) uint8) holding the layer's own integers, or None when its grid is not
    one of GGUF's block formats."""
    from gguf import GGMLQuantizationType

    rows, cols = quantized.shape
    if quantized.g_idx is not None or cols % BLOCK or quantized.group_size % BLOCK:
        return None
    if quantized.bits > 4 and not (quantized.bits == 8 and quantized.symmetric):
        return None
    blocks = cols // BLOCK
    repeat = quantized.group_size // BLOCK
    ints = quantized.ints().reshape(rows, blocks, BLOCK)
    scales = quantized.scales.half().repeat_interleave(repeat, 1)
    zeros = quantized.zeros().repeat_interleave(repeat, 1)
    d = scales.numpy().view(np.uint8).reshape(rows, blocks, 2)
    if quantized.bits == 8:
        values = (ints - zeros[..., None]).to(torch.int8).numpy().view(np.uint8)
        return GGMLQuantizationType.Q8_0, np.concatenate([d, values], -1).reshape(rows, -1)
    if quantized.symmetric:
        kind, fields, head = GGMLQuantizationType.Q4_0, ints - zeros[..., None] + 8, [d]
    else:
        m = (-scales.float() * zeros).half().numpy().view(np.uint8).reshape(rows, blocks, 2)
        kind, fields, head = GGMLQuantizationType.Q4_1, ints, [d, m]
    fields = fields.to(torch.uint8)
    nibbles = (fields[..., :BLOCK // 2] | fields[..., BLOCK // 2:] << 4).numpy()  # GGML: element j low, j + 16 high
    return kind, np.concatenate(head + [nibbles], -1).reshape(rows, -1)


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's rotary embedding reads q or k in: within each head, dimension j of the first half
    then dimension j of the second, for every j."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def llama_config(model: nn.Module) -> dict:
    config = model.config
    if getattr(config, "model_type", None) not in LLAMA_TYPES:
        raise CompressError(f"GGUF export writes llama.cpp's llama architecture ({', '.join(LLAMA_TYPES)} models); "
                            f"this model is '{getattr(config, 'model_type', None)}'")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CompressError(f"GGUF export: rope scaling ({rope.get('rope_type', rope.get('type'))}) is not written; "
                            "export --format gptq or dense instead")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CompressError("GGUF export: llama.cpp's llama architecture has no biases in attention or MLP")
    heads = config.num_attention_heads
    return {"blocks": config.num_hidden_layers, "context": config.max_position_embeddings,
            "hidden": config.hidden_size, "mlp": config.intermediate_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "rope_theta": getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0),
            "eps": config.rms_norm_eps, "vocab": config.vocab_size}


def pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, when it is one llama.cpp knows by that structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if not parts:
        return None
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    pattern = json.dumps(parts[0].get("pattern", {})).replace("\\\\", "\\")
    if kinds == ["Split", "ByteLevel"] and "\\p{N}{1,3}" in pattern:  # Llama 3's split of numbers in threes
        return "llama-bpe"
    return None


def add_tokenizer(writer, tokenizer, vocab_size: int) -> tuple[list[str], str]:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) model; returns (warnings, the pre-tokenizer written)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CompressError("GGUF export needs a fast (tokenizer.json) tokenizer")
    data = json.loads(backend.to_str())
    if data["model"]["type"] != "BPE":
        raise CompressError(f"GGUF export writes byte-level BPE tokenizers; this one is {data['model']['type']}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_USER_DEFINED] * vocab_size
    for text, index in data["model"]["vocab"].items():
        if index < vocab_size:
            tokens[index], types[index] = text, TOKEN_NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer(data) or "default"
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{kind}_token_id", None)
        if index is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[kind])(index)
    bos = getattr(tokenizer, "bos_token_id", None)
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    warnings = [] if pre != "default" else [
        "the tokenizer's pre-tokenizer is not one llama.cpp knows by its structure: written as 'default', so "
        "llama.cpp may split text into other tokens than transformers does"]
    return warnings, pre


def write_gguf(model: nn.Module, tokenizer, directory: Path, options) -> tuple[list[str], dict]:
    """FILE in `directory`: the model in llama.cpp's llama architecture, quantized layers carried over as blocks
    where their grid allows (see the module docstring)."""
    import gguf

    config = llama_config(model)
    compressed = {name: layer for name, layer in model.named_modules() if isinstance(layer, CompressedLinear)}
    factored = [name for name, layer in compressed.items() if layer.up is not None]
    if factored and not options.merge_lowrank:
        raise CompressError(f"{len(factored)} layers have low-rank factors (e.g. {factored[0]}), which GGUF cannot "
                            "hold beside the integers: pass --merge-lowrank to merge them and re-quantize to Q8_0")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["blocks"])
    writer = gguf.GGUFWriter(str(directory / FILE), "llama")
    writer.add_name(getattr(model.config, "_name_or_path", "") or "compressed")
    writer.add_block_count(config["blocks"])
    writer.add_context_length(config["context"])
    writer.add_embedding_length(config["hidden"])
    writer.add_feed_forward_length(config["mlp"])
    writer.add_head_count(config["heads"])
    writer.add_head_count_kv(config["kv_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["eps"]))
    writer.add_vocab_size(config["vocab"])
    warnings, pre = add_tokenizer(writer, tokenizer, config["vocab"])

    kinds: Counter = Counter()
    requantized, merged = [], []
    tied = getattr(model.config, "tie_word_embeddings", False)
    prefixes = tuple(f"{name}." for name in compressed)
    for key, tensor in model.state_dict().items():
        if key.startswith(prefixes) or (tied and key == "lm_head.weight") or "rotary" in key:
            continue
        name = gguf_name(names, key)
        tensor = rotated(key, tensor.float(), config)
        if tensor.ndim == 1:
            writer.add_tensor(name, tensor.numpy())
            kinds["F32"] += 1
        else:
            writer.add_tensor(name, tensor.half().numpy())
            kinds["F16"] += 1
    for module, layer in compressed.items():
        name = gguf_name(names, f"{module}.weight")
        quantized = layer.base.operand() if layer.up is None and hasattr(layer.base, "operand") else None
        found = block_bytes(quantized) if isinstance(quantized, QuantizedWeight) else None
        if found is None:
            weight = rotated(f"{module}.weight", layer.weight_approx().detach().float(), config)
            (merged if module in factored else requantized).append(module)
            if weight.shape[1] % BLOCK:
                writer.add_tensor(name, weight.half().numpy())
                kinds["F16"] += 1
                continue
            kind = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(weight.numpy(), kind)
        else:
            kind, data = found
            data = rotated(f"{module}.weight", torch.from_numpy(data), config).numpy()
        writer.add_tensor(name, data, raw_dtype=kind)
        kinds[kind.name] += 1
        if layer.bias is not None:
            writer.add_tensor(gguf_name(names, f"{module}.bias"), layer.bias.detach().float().numpy())
    writer.add_file_type(file_type(kinds))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if requantized:
        warnings.append(f"{len(requantized)} quantized layers have a grid GGUF's blocks cannot hold (e.g. "
                        f"{', '.join(requantized[:3])}): re-quantized to Q8_0")
    if merged:
        warnings.append(f"{len(merged)} layers with low-rank factors (e.g. {merged[0]}) merged and re-quantized to "
                        "Q8_0")
    return warnings, {"file": FILE, "tensor_types": dict(sorted(kinds.items())),
                      "carried_over": len(compressed) - len(requantized) - len(merged),
                      "requantized": requantized, "merged": merged,
                      "tokenizer_pre": pre}


def gguf_name(names, key: str) -> str:
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CompressError(f"GGUF export: no llama.cpp tensor name for {key}")
    return name


def rotated(key: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """q_proj/k_proj rows in llama.cpp's rotary order; every other tensor as it is."""
    if key.endswith("q_proj.weight"):
        return tensor[rotary_rows(tensor.shape[0], config["heads"])]
    if key.endswith("k_proj.weight"):
        return tensor[rotary_rows(tensor.shape[0], config["kv_heads"])]
    return tensor


def file_type(kinds: Counter):
    """general.file_type: the quantized type most tensors take."""
    from gguf import LlamaFileType

    quantized = {kind: count for kind, count in kinds.items() if kind.startswith("Q")}
    if not quantized:
        return LlamaFileType.MOSTLY_F16
    return {"Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1,
            "Q8_0": LlamaFileType.MOSTLY_Q8_0}[max(quantized, key=quantized.get)]
