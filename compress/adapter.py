"""Low-rank factors written as a PEFT LoRA adapter: lora_B @ lora_A = up @ down, scale lora_alpha / r = 1."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_lora_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_model: str, directory: Path) -> None:
    """factors: {module name: (up (out, r), down (r, in))}, all of one rank; writes adapter_config.json and
    adapter_model.safetensors (fp16) into `directory`."""
    ranks = {down.shape[0] for _, down in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"a LoRA adapter here holds one rank, got {sorted(ranks)}")
    rank = ranks.pop()
    tensors = {}
    for name, (up, down) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = down.to(torch.float16).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = up.to(torch.float16).contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted({name.rsplit(".", 1)[-1] for name in factors}), "init_lora_weights": True,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
