"""`LlavaTinyConfig` / `LlavaTinyForCausalLM`: transformers' LLaVA with a configurable projector.

Only the projector differs from stock `LlavaForConditionalGeneration`. A model whose projector
is `mlp2x_gelu` is saved with `model_type: "llava"`, so stock transformers (and vLLM/SGLang) load
the folder with no project code; other projectors keep `model_type: "llava_tiny"`, registered
with the Auto classes when this package is imported.
"""
from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

from .projector import build_projector, is_stock_llava_projector


@strict
class LlavaTinyConfig(LlavaConfig):
    """`LlavaConfig` plus `mm_projector_type` and where the parts came from."""

    model_type = "llava_tiny"
    mm_projector_type: str = "mlp2x_gelu"
    # Recorded so a projector-only (stage-1) or LoRA folder can be rebuilt from its base parts.
    mm_llm_path: str | None = None
    mm_vision_tower: str | None = None
    conversation_template: str = "llava_v1"

    def to_dict(self):
        data = super().to_dict()
        if is_stock_llava_projector(self.mm_projector_type):
            data["model_type"] = "llava"
            data["architectures"] = ["LlavaForConditionalGeneration"]
        return data


class LlavaTinyForCausalLM(LlavaForConditionalGeneration):
    """LLaVA (vision tower -> projector -> causal LM) with the projector from `mm_projector_type`."""

    config_class = LlavaTinyConfig

    def __init__(self, config: LlavaTinyConfig):
        super().__init__(config)
        if not is_stock_llava_projector(config.mm_projector_type):
            self.model.multi_modal_projector = build_projector(
                config.mm_projector_type, config.vision_config.hidden_size, config.text_config.hidden_size,
                bias=config.multimodal_projector_bias)
            self.post_init()

    def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
        """Stock forward; in training, a text-only batch still runs the vision tower and projector
        on a blank image (adding 0 to the loss), in the same order as image batches: ZeRO-3 gathers
        parameters with collectives every rank must call alike, and DDP expects a gradient for every
        trainable parameter."""
        if not (self.training and pixel_values is None and input_ids is not None and torch.is_grad_enabled()):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, inputs_embeds=inputs_embeds, **kwargs)
        inputs_embeds = self.get_input_embeddings()(input_ids)
        vision = self.config.vision_config
        blank = torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size,
                            dtype=self.model.vision_tower.dtype, device=input_ids.device)
        features = self.model.get_image_features(pixel_values=blank).pooler_output[0]
        out = super().forward(inputs_embeds=inputs_embeds, **kwargs)
        if out.loss is not None:
            out.loss = out.loss + 0.0 * features.sum()
        return out


AutoConfig.register("llava_tiny", LlavaTinyConfig)
AutoModelForImageTextToText.register(LlavaTinyConfig, LlavaTinyForCausalLM)

