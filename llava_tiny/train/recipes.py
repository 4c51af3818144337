"""Training recipes: which parts are frozen, fully trained or LoRA-adapted.

    projector  stage 1 (--tune_mm_mlp_adapter): projector only
    lora       --lora_enable: LoRA on the LLM's linear layers + projector (+ tower if unfrozen)
    full       full fine-tuning: LLM + projector (+ tower if unfrozen), LLM frozen by --freeze_backbone
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def recipe_name(model_args, training_args) -> str:
    if model_args.tune_mm_mlp_adapter:
        if training_args.lora_enable:
            raise ValueError("--tune_mm_mlp_adapter (stage 1) trains only the projector; do not combine it with --lora_enable")
        return "projector"
    if training_args.bits in (4, 8) and not training_args.lora_enable:
        raise ValueError(f"--bits {training_args.bits} quantizes the LLM, which can then only be trained with --lora_enable True")
    return "lora" if training_args.lora_enable else "full"


def apply_recipe(model, recipe: str, model_args, training_args):
    """Set requires_grad per part (and wrap with LoRA); return the model to train."""
    model.requires_grad_(False)
    inner = model.model
    if not training_args.freeze_mm_mlp_adapter:
        inner.multi_modal_projector.requires_grad_(True)
    if model_args.unfreeze_mm_vision_tower and recipe != "projector":
        inner.vision_tower.requires_grad_(True)
    if recipe == "full" and not model_args.freeze_backbone:
        inner.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if recipe == "lora":
        from ..model.lora import apply_lora

        if training_args.bits in (4, 8):
            from peft import prepare_model_for_kbit_training

            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs)
            for name, param in model.named_parameters():  # prepare_* freezes everything
                param.requires_grad_(name in trainable)
        model = apply_lora(model, r=training_args.lora_r, alpha=training_args.lora_alpha,
                           dropout=training_args.lora_dropout, bias=training_args.lora_bias)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("recipe %s: %d of %d parameters trainable (%.2f%%)", recipe, trainable, total, 100 * trainable / max(total, 1))
    return model
