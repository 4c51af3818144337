"""LoRA on the language model only, and the checkpoint that goes with it.

A LoRA checkpoint folder holds `adapter_config.json` + `adapter_model.safetensors` (peft), and
`non_lora_trainables.safetensors`: every other trained weight (projector; vision tower when tuned),
so the folder alone (plus its base parts) rebuilds the trained model.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from .builder import NON_LORA_FILE

LLM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(layers=LLM_LINEAR_LAYERS, include_vision: bool = False) -> str:
    """A peft `target_modules` regex on the language model's linear layers.

    Plain names like ["q_proj", "v_proj"] also match CLIP's attention, so LoRA would silently
    adapt the vision tower too.
    """
    scope = "(language_model|vision_tower)" if include_vision else "language_model"
    return rf".*{scope}.*\.({'|'.join(layers)})"


def apply_lora(model, r: int = 128, alpha: int = 256, dropout: float = 0.05, bias: str = "none",
               include_vision: bool = False):
    """Wrap `model` with LoRA adapters on the LLM's linear layers; other trainable flags are kept."""
    from peft import LoraConfig, get_peft_model

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias,
                        target_modules=lora_target_regex(include_vision=include_vision), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    # peft freezes everything but the adapters; give back what the recipe made trainable.
    for name, param in model.named_parameters():
        if name in trainable and "lora_" not in name:
            param.requires_grad_(True)
    return peft_model


def _base_name(name: str) -> str:
    """Parameter name of the unwrapped model ('base_model.model.' and '.base_layer' removed)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def non_lora_trainables(peft_model) -> dict[str, torch.Tensor]:
    """Trainable weights that are not LoRA adapters, keyed as in the unwrapped model."""
    return {_base_name(n): p.detach().cpu().contiguous() for n, p in peft_model.named_parameters()
            if p.requires_grad and "lora_" not in n}


def save_lora_checkpoint(peft_model, processor, save_dir: str, state_dict: dict | None = None,
                         non_lora_state: dict | None = None) -> None:
    """Write adapter + non-LoRA trainables + config + tokenizer/processor (all safetensors).

    `state_dict` / `non_lora_state` let the caller pass tensors it gathered (ZeRO-3).
    """
    os.makedirs(save_dir, exist_ok=True)
    peft_model.save_pretrained(save_dir, state_dict=state_dict, safe_serialization=True)
    extra = non_lora_state if non_lora_state is not None else non_lora_trainables(peft_model)
    save_file(extra, os.path.join(save_dir, NON_LORA_FILE), metadata={"format": "pt"})
    peft_model.get_base_model().config.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
