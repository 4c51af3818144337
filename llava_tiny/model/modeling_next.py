"""`LlavaTinyNextConfig` / `LlavaTinyNextForCausalLM`: transformers' LLaVA-NeXT ("anyres") as this project trains it.

Stock `LlavaNextModel` already tiles, projects, unpads (`spatial_unpad`), appends `image_newline` to each
row and scatters the features; ours adds what `LlavaTinyForCausalLM` adds to stock LLaVA: the
placeholder-mismatch error, the blank image for text-only training batches, and non-stock projectors.
An `mlp2x_gelu` model is saved with `model_type: "llava_next"`, so stock transformers (and vLLM/SGLang)
load the folder with no project code; other projectors keep `model_type: "llava_tiny_next"`, registered
with the Auto classes when this package is imported.
"""
from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (LlavaNextModel, LlavaNextPreTrainedModel,
                                                                image_size_to_num_patches)

from .modeling import BlankImageForward, PlaceholderCheck, init_with_projector
from .projector import is_stock_llava_projector


@strict
class LlavaTinyNextConfig(LlavaNextConfig):
    """`LlavaNextConfig` plus the fields `LlavaTinyConfig` adds to `LlavaConfig` (read by the same code)."""

    model_type = "llava_tiny_next"
    mm_projector_type: str = "mlp2x_gelu"
    mm_llm_path: str | None = None
    mm_vision_tower: str | None = None
    mm_base_model: str | None = None
    conversation_template: str = "llava_v1"
    image_aspect_ratio: str = "anyres"
    image_background: str = "white"

    def to_dict(self):
        data = super().to_dict()
        if is_stock_llava_projector(self.mm_projector_type):  # stock LLaVA-NeXT's projector is mlp2x_gelu
            data["model_type"] = "llava_next"
            data["architectures"] = ["LlavaNextForConditionalGeneration"]
        return data


class LlavaTinyNextModel(PlaceholderCheck, LlavaNextModel):
    """Stock `LlavaNextModel` with a plain error for image-token mismatches and the blank-image mode."""

    placeholders_expected = ("its own image's count (llava_tiny.anyres.anyres_num_image_tokens of the image's size "
                             "under image_grid_pinpoints {0.image_grid_pinpoints}, as LlavaNextProcessor expands it)")


class LlavaTinyNextForCausalLM(BlankImageForward, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (tiles + overview -> tower -> projector -> unpad + image_newline -> causal LM), with the
    projector from `mm_projector_type`."""

    config_class = LlavaTinyNextConfig

    def __init__(self, config: LlavaTinyNextConfig):
        init_with_projector(self, config, LlavaNextPreTrainedModel, LlavaTinyNextModel)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                logits_to_keep=0, mm_encoder_outputs=None, **kwargs):
        """Stock forward, with a blank image for text-only training batches (`BlankImageForward`)."""
        # The signature generate() reads, as `LlavaTinyForCausalLM.forward`, plus each image's size.
        if pixel_values is not None:
            kwargs["image_sizes"] = image_sizes
        return self._forward_images(super().forward, input_ids, pixel_values, attention_mask=attention_mask,
                                    position_ids=position_ids, logits_to_keep=logits_to_keep,
                                    mm_encoder_outputs=mm_encoder_outputs, **kwargs)

    def _blank_image(self, device) -> dict:
        """One all-zero tower-sized image, as many tiles as the pinpoints cut a square image into."""
        side = self.config.vision_config.image_size
        tiles = image_size_to_num_patches((side, side), self.config.image_grid_pinpoints, side)
        pixels = super()._blank_image(device)["pixel_values"]
        return {"pixel_values": pixels.unsqueeze(0).expand(1, tiles, *pixels.shape[1:]),
                "image_sizes": torch.tensor([[side, side]], device=device)}


def is_next(model) -> bool:
    """Whether `model` (unwrapped) reads images as LLaVA-NeXT tiles."""
    return isinstance(getattr(model, "config", None), LlavaNextConfig)


AutoConfig.register("llava_tiny_next", LlavaTinyNextConfig)
AutoModelForImageTextToText.register(LlavaTinyNextConfig, LlavaTinyNextForCausalLM)
