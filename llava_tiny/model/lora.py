"""LoRA adapters on the language model only (recipes decide when; this says where)."""
from __future__ import annotations

LLM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(layers=LLM_LINEAR_LAYERS) -> str:
    """A peft `target_modules` regex on the language model's linear layers.

    Plain names like ["q_proj", "v_proj"] also match CLIP's attention, so LoRA would silently
    adapt the vision tower too.
    """
    return rf".*language_model.*\.({'|'.join(layers)})"


def apply_lora(model, r: int = 128, alpha: int = 256, dropout: float = 0.05, bias: str = "none"):
    """Wrap `model` with LoRA adapters on the LLM's linear layers, leaving what else trains as it was
    (peft's `get_peft_model` freezes every non-adapter parameter)."""
    from peft import LoraConfig, get_peft_model

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, target_modules=lora_target_regex(),
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if name in trainable and "lora_" not in name:
            param.requires_grad_(True)
    return peft_model
