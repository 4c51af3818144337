"""A LLaVA-1.5 model made a LLaVA-NeXT ("anyres") one, as LLaVA-NeXT's recipe starts: the same tower, projector and
language model, and a fresh `image_newline` that then trains with the projector.

Like assembly (`assembly.attach_vision`), the NeXT model is a meta-device shell that the loaded parts are
attached to: no second language model is ever built.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from ..anyres import parse_grid_pinpoints
from .assembly import LoadedModel, _without_zero3_init, build_processor, count_parameters
from .modeling import unwrap_model
from .modeling_next import LlavaTinyNextConfig, LlavaTinyNextForCausalLM, is_next

logger = logging.getLogger(__name__)

# What a LLaVA-1.5 config hands on to the NeXT config unchanged.
_KEPT = ("image_token_index", "projector_hidden_act", "vision_feature_select_strategy", "vision_feature_layer",
         "multimodal_projector_bias", "image_seq_length", "mm_projector_type", "mm_llm_path", "mm_vision_tower",
         "mm_base_model", "conversation_template", "image_background")


def with_anyres(loaded: LoadedModel, image_grid_pinpoints) -> LoadedModel:
    """`loaded` reading images as anyres tiles under `image_grid_pinpoints` (`--image_grid_pinpoints`, either of
    LLaVA-NeXT's forms): a LLaVA-1.5 model is converted (`to_next`); a NeXT model takes the pinpoints (its
    `image_newline` kept). The processor is a stock `LlavaNextProcessor` with the same pinpoints."""
    model = unwrap_model(loaded.model)
    pinpoints = parse_grid_pinpoints(image_grid_pinpoints, model.config.vision_config.image_size)
    if is_next(model):
        if model.config.image_grid_pinpoints != pinpoints:
            logger.info("image_grid_pinpoints %s (was %s)", pinpoints, model.config.image_grid_pinpoints)
        model.config.image_grid_pinpoints = pinpoints
    else:
        model = to_next(model, pinpoints)
    processor = build_processor(loaded.image_processor, loaded.tokenizer, model.config, model.config.conversation_template)
    return dataclasses.replace(loaded, model=model, processor=processor)


def to_next(model, pinpoints: list[list[int]]) -> LlavaTinyNextForCausalLM:
    """The LLaVA-1.5 `model`'s tower, projector and language model in a NeXT model; `image_newline` initialised as
    LLaVA-NeXT and stock `LlavaNextModel` do (normal, std 1/sqrt(hidden size))."""
    old = model.config
    config = LlavaTinyNextConfig(text_config=old.text_config, vision_config=old.vision_config,
                                 image_grid_pinpoints=pinpoints, image_aspect_ratio="anyres",
                                 **{name: getattr(old, name) for name in _KEPT})
    with torch.device("meta"), _without_zero3_init():
        next_model = LlavaTinyNextForCausalLM(config)
    next_model.model.language_model = model.model.language_model
    next_model.model.vision_tower = model.model.vision_tower
    next_model.model.multi_modal_projector = model.model.multi_modal_projector
    next_model.lm_head = model.lm_head
    embeddings = model.get_input_embeddings().weight
    hidden = config.text_config.hidden_size
    next_model.model.image_newline = nn.Parameter(
        torch.randn(hidden, dtype=embeddings.dtype).to(embeddings.device) / math.sqrt(hidden))
    next_model.config.dtype = embeddings.dtype
    attention = old.text_config._attn_implementation
    if attention:  # the NeXT shell re-resolves its sub-configs to the default; keep what the LLM loaded with
        next_model.set_attn_implementation({"text_config": attention})
    leftover = [n for n, t in [*next_model.named_parameters(), *next_model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"the anyres conversion left tensors on the meta device: {leftover[:5]}")
    logger.info("anyres (LLaVA-NeXT) model from the LLaVA-1.5 parts: %d parameters (+%d image_newline), pinpoints %s",
                count_parameters(next_model), hidden, pinpoints)
    return next_model
