"""Where LoRA adapters go: linear layers of the language model only (recipes decide when).

`--lora_target_modules all-linear` (the default) finds every linear layer of the language model
by module type, whatever its name (Llama's q_proj..down_proj, Phi-3's qkv_proj/gate_up_proj,
GPT-2's c_attn/c_fc Conv1D), except lm_head; a comma list keeps only layers with those names. The
tower and projector never get adapters. The targets are passed to peft as full module names, so
plain names cannot also match CLIP's attention.
"""
from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def _is_linear(module) -> bool:
    # bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear; GPT-2 uses transformers' Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _language_model_prefix(model) -> str:
    """'' for a causal LM; the language model's prefix inside a LLaVA."""
    return "model.language_model." if hasattr(getattr(model, "model", None), "language_model") else ""


def lora_target_names(model, requested: str = "all-linear") -> list[str]:
    """Full names of the language model's linear layers that `requested` selects ('all-linear' or 'a,b')."""
    prefix = _language_model_prefix(model)
    wanted = None if requested == "all-linear" else {n.strip() for n in requested.split(",") if n.strip()}
    candidates = [name for name, module in model.named_modules()
                  if name.startswith(prefix) and _is_linear(module) and name.rsplit(".", 1)[-1] != "lm_head"
                  and not name.startswith(("model.vision_tower", "model.multi_modal_projector"))]
    chosen = [name for name in candidates if wanted is None or name.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ValueError(f"--lora_target_modules {requested}: matches no linear layer of the language model; "
                         f"its linear layers are named {available}")
    return chosen


def apply_lora(model, r: int = 128, alpha: int = 256, dropout: float = 0.05, bias: str = "none",
               target_modules: str = "all-linear"):
    """Wrap `model` with LoRA adapters on the language model's linear layers chosen by `target_modules`,
    leaving what else trains as it was (peft's `get_peft_model` freezes every non-adapter parameter)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_names(model, target_modules)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, target_modules=targets,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if name in trainable and "lora_" not in name:
            param.requires_grad_(True)
    logger.info("LoRA adapters on %d linear layers of the language model (%s)", len(targets),
                ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets})))
    return peft_model
