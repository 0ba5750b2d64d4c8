"""Architectures as data: per model family, where the decoder blocks are, which linears they hold, and the order
in which data flows through them.

`groups` lists a block's linears in data-flow order, each group the linears that read one tensor (one Gram):
true-sequential compression takes them group by group. `attention` and `mlp` name the projections LoRAP treats
differently (empty where a family fuses them). `sublayers` names the block's submodules whose output depends only
on their input and their own linears (the attention, the MLP): once those linears are compressed, the block's
later passes replay their recorded outputs instead of running them. Whether the head is tied to the embeddings is
the config's own `tie_word_embeddings`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.errors import CompressError
from compress.layer import CompressedLinear


@dataclass(frozen=True)
class Architecture:
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    attention: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ()
    sublayers: tuple[str, ...] = ()
    embeddings: str = "model.embed_tokens"
    norm: str = "model.norm"
    head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


LLAMA = Architecture(
    blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    sublayers=("self_attn", "mlp"),
)
PHI3 = Architecture(
    blocks="model.layers",
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    sublayers=("self_attn", "mlp"),
)
ARCHITECTURES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "phi3": PHI3}


def architecture(model: nn.Module) -> Architecture:
    """The table's entry for the model's family, checked against the model: a one-line error names what is missing."""
    model_type = getattr(model.config, "model_type", None)
    entry = ARCHITECTURES.get(model_type)
    if entry is None:
        raise CompressError(f"no architecture entry for model type '{model_type}' ({type(model).__name__}); "
                            f"{_discovered(model)}add its blocks, linears and data-flow groups to "
                            "ARCHITECTURES in compress/architectures.py (supported: "
                            f"{', '.join(sorted(ARCHITECTURES))})")
    try:
        blocks = model.get_submodule(entry.blocks)
    except AttributeError:
        raise CompressError(f"{type(model).__name__} has no decoder blocks at '{entry.blocks}' "
                            f"(compress/architectures.py, model type '{model_type}')") from None
    linears = {name for name, module in blocks[0].named_modules() if isinstance(module, (nn.Linear, CompressedLinear))}
    modules = {name for name, _ in blocks[0].named_modules()}
    missing = [name for name in entry.linears if name not in linears] + \
        [name for name in entry.sublayers if name not in modules]
    unknown = sorted(linears - set(entry.linears))
    if missing or unknown:
        raise CompressError(f"the blocks of {type(model).__name__} do not match compress/architectures.py's entry for "
                            f"'{model_type}': missing {missing or 'none'}, not listed {unknown or 'none'}")
    return entry


def _discovered(model: nn.Module) -> str:
    """What optimum's block discovery sees in an unknown model, as a hint for writing its entry."""
    from calibration import block_linears, find_blocks

    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        return ""
    return f"its blocks look like '{prefix}' with linears {list(block_linears(blocks[0]))}: "
