"""Where a model's decoder blocks and their linears are, from optimum's knowledge of architectures."""
from __future__ import annotations

from torch import nn


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ModuleList of the model's decoder blocks (e.g. 'model.layers')."""
    from optimum.gptq.utils import get_block_name_with_pattern

    try:
        name = get_block_name_with_pattern(model)
    except ValueError:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}") from None
    return name, model.get_submodule(name)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers by their name inside the block (e.g. 'self_attn.q_proj'), in forward order."""
    from optimum.gptq.utils import get_layers

    return {name: layer for name, layer in get_layers(block, layers=[nn.Linear]).items()}
