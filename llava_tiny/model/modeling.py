"""`LlavaTinyConfig` / `LlavaTinyForCausalLM`: transformers' LLaVA with a configurable projector.

Only the projector differs from stock `LlavaForConditionalGeneration`. A model whose projector
is `mlp2x_gelu` is saved with `model_type: "llava"`, so stock transformers (and vLLM/SGLang) load
the folder with no project code; other projectors keep `model_type: "llava_tiny"`, registered
with the Auto classes when this package is imported.
"""
from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaModel, LlavaPreTrainedModel

from .projector import build_projector, is_stock_llava_projector


@strict
class LlavaTinyConfig(LlavaConfig):
    """`LlavaConfig` plus `mm_projector_type` and where the parts came from."""

    model_type = "llava_tiny"
    mm_projector_type: str = "mlp2x_gelu"
    # Recorded so a projector-only (stage-1) or LoRA folder can be rebuilt from its base: the full VLM
    # it was fine-tuned from (`mm_base_model`), else the LLM and tower it was assembled from.
    mm_llm_path: str | None = None
    mm_vision_tower: str | None = None
    mm_base_model: str | None = None
    conversation_template: str = "llava_v1"
    # How training prepared images (`images.preprocess_images`): serving, evaluation and export read them here.
    image_aspect_ratio: str = "pad"
    image_background: str = "white"

    def to_dict(self):
        data = super().to_dict()
        if is_stock_llava_projector(self.mm_projector_type):
            data["model_type"] = "llava"
            data["architectures"] = ["LlavaForConditionalGeneration"]
        return data


class PlaceholderCheck:
    """A plain error for image-token mismatches, and the blank-image mode of `BlankImageForward` (mixed into
    stock `LlavaModel` and `LlavaNextModel`)."""

    blank_image_batch = False
    placeholders_expected = ""  # how each <image> must expand, for the error

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if self.blank_image_batch:  # features computed, scattered nowhere: same graph as an image batch
            return torch.zeros(*inputs_embeds.shape[:2], 1, dtype=torch.bool, device=inputs_embeds.device)
        if input_ids is not None:
            placeholders = int((input_ids == self.config.image_token_id).sum())
            features = image_features.shape[0]  # all images' feature vectors, concatenated
            if placeholders != features:
                raise ValueError(
                    f"the batch has {placeholders} image placeholder tokens but its images give {features} feature "
                    f"vectors; each <image> must expand to {self.placeholders_expected.format(self.config)} "
                    f"(use llava_tiny.conversation.tokenize_conversation or the saved processor)")
        return super().get_placeholder_mask(input_ids, inputs_embeds, image_features)


class LlavaTinyModel(PlaceholderCheck, LlavaModel):
    """Stock `LlavaModel` with a plain error for image-token mismatches, and a blank-image mode for
    text-only training batches (see `BlankImageForward`)."""

    placeholders_expected = "exactly {0.image_seq_length} tokens for this vision tower"


def init_with_projector(model, config, pretrained_class, inner_class) -> None:
    """The stock __init__ of a LLaVA-family model, with `inner_class` inside and the projector `mm_projector_type`
    names (the stock one for mlp2x_gelu)."""
    pretrained_class.__init__(model, config)
    model.model = inner_class(config)
    if not is_stock_llava_projector(config.mm_projector_type):
        model.model.multi_modal_projector = build_projector(
            config.mm_projector_type, config.vision_config.hidden_size, config.text_config.hidden_size,
            bias=config.multimodal_projector_bias)
    model.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
    model.post_init()


class BlankImageForward:
    """Stock forward, except that a text-only batch still runs the vision tower and projector on a blank
    image, scattered into no position (its gradient is zero), when other ranks may be running them
    (see `_runs_blank_image`)."""

    def _forward_images(self, stock_forward, input_ids, pixel_values, **kwargs):
        if pixel_values is not None or input_ids is None or not self._runs_blank_image():
            return stock_forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        self.model.blank_image_batch = True
        try:
            return stock_forward(input_ids=input_ids, **kwargs, **self._blank_image(input_ids.device))
        finally:
            self.model.blank_image_batch = False

    def _blank_image(self, device) -> dict:
        """The forward's image inputs for one all-zero tower-sized image."""
        vision = self.config.vision_config
        return {"pixel_values": torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size,
                                            dtype=self.model.vision_tower.dtype, device=device)}

    def _runs_blank_image(self) -> bool:
        """Whether a forward without images must still call the tower and projector:
        - in training, so every rank calls the same modules forward and backward and every trainable
          parameter gets a gradient (DDP and ZeRO reduce them with collectives);
        - under ZeRO-3 always, also under no_grad (evaluation, DPO's reference log-probs, generation): each
          forward gathers the partitioned parameters module by module, so one rank skipping the tower
          while another runs it is a collective mismatch (gloo aborts, NCCL hangs; DeepSpeed #7170)."""
        if self.training and torch.is_grad_enabled():
            return True
        return hasattr(next(self.model.vision_tower.parameters()), "ds_id")  # set on ZeRO-3 partitioned params


class LlavaTinyForCausalLM(BlankImageForward, LlavaForConditionalGeneration):
    """LLaVA (vision tower -> projector -> causal LM) with the projector from `mm_projector_type`."""

    config_class = LlavaTinyConfig

    def __init__(self, config: LlavaTinyConfig):
        init_with_projector(self, config, LlavaPreTrainedModel, LlavaTinyModel)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, logits_to_keep=0,
                mm_encoder_outputs=None, **kwargs):
        """Stock forward, with a blank image for text-only training batches (`BlankImageForward`)."""
        # generate() reads this signature to decide what to pass: attention_mask/position_ids (positions
        # for padded rows), logits_to_keep (1: without it the prefill computed batch x prompt x vocabulary
        # logits, of which generation reads the last position only) and mm_encoder_outputs.
        return self._forward_images(super().forward, input_ids, pixel_values, attention_mask=attention_mask,
                                    position_ids=position_ids, logits_to_keep=logits_to_keep,
                                    mm_encoder_outputs=mm_encoder_outputs, **kwargs)


def unwrap_model(model):
    """The LLaVA model under peft / DeepSpeed / DDP wrappers (the one unwrapper of this project)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def image_seq_length(model) -> int:
    """Placeholders per image; 0 for a text-only model (no vision tower)."""
    return getattr(unwrap_model(model).config, "image_seq_length", 0)


def language_model(model):
    """The module whose config holds the language model's attention implementation."""
    llava = unwrap_model(model)
    inner = getattr(llava, "model", None)
    return inner.language_model if hasattr(inner, "language_model") else llava


AutoConfig.register("llava_tiny", LlavaTinyConfig)
AutoModelForImageTextToText.register(LlavaTinyConfig, LlavaTinyForCausalLM)

