"""A loaded checkpoint as the server sees it, resolved once: its chat template, the ids that end an
answer, how its images are prepared, the image tokens and context it holds, and what a request may
ask of it. The engine, the API, the web chat and the CLI share one `ServedModel`; nothing of this
is worked out again per request or per batch.

    model = ServedModel.resolve(load_pretrained_model("runs/lora"), limits=Limits(max_images=2))
    engine = Engine(model)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from ..conversation import get_template, stop_token_ids
from ..images import image_settings
from ..inference import ImageReader, Prompt, checked_prompt, template_name
from ..model.modeling import unwrap_model

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece's byte fallback


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's --max-* flags)."""

    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_new_tokens_limit: int = 1024
    default_max_tokens: int = 256


def context_length(loaded) -> int:
    """Positions the language model holds: its config, or the tokenizer's limit when smaller."""
    config = unwrap_model(loaded.model).config
    text = getattr(config, "text_config", config)  # a text-only model is its own text config
    limit = getattr(text, "max_position_embeddings", None) or 2048
    tokenizer_limit = getattr(loaded.tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 1_000_000:  # transformers' "no limit" is 1e30
        limit = min(limit, tokenizer_limit)
    return limit


@dataclass(frozen=True)
class ServedModel:
    """Everything serving needs to know about one loaded model (build it with `resolve`)."""

    loaded: object  # model.builder.LoadedModel
    template: object  # ChatTemplate or AutoTemplate
    stop_ids: tuple[int, ...]  # ids that end an answer (stop_token_ids of the template)
    byte_ids: frozenset[int]  # byte-fallback tokens, whose text settles only with the next token
    image_aspect_ratio: str | None  # None: anyres tiles
    image_background: str
    images: ImageReader  # placeholders and pixels of each image (anyres: each its own count)
    context: int  # positions the model holds
    limits: Limits

    @classmethod
    def resolve(cls, loaded, conv_mode: str | None = None, limits: Limits = Limits(),
                image_aspect_ratio: str | None = None, image_background: str | None = None) -> "ServedModel":
        """Resolve `loaded` for serving: `conv_mode` and the image settings override what the checkpoint
        recorded (its template, image_aspect_ratio and image_background in config.json)."""
        template = get_template(template_name(loaded, conv_mode))
        images = ImageReader.of(loaded)
        images.check_aspect_ratio(image_aspect_ratio)
        aspect, background = image_settings(unwrap_model(loaded.model).config, image_aspect_ratio, image_background)
        aspect = None if images.anyres else aspect  # anyres: tiles, whatever the config records
        vocab = loaded.tokenizer.get_vocab()
        return cls(loaded=loaded, template=template, stop_ids=tuple(stop_token_ids(loaded.tokenizer, template)),
                   byte_ids=frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.fullmatch(token)),
                   image_aspect_ratio=aspect, image_background=background,
                   images=images, context=context_length(loaded), limits=limits)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def prompt(self, question: str, images: list[Image.Image] = (), history: list[tuple[str, str]] = (),
               system: str | None = None) -> Prompt:
        """The prompt ids as training renders them (`inference.build_prompt`, with this model's template)."""
        return checked_prompt(self.tokenizer, self.template, self.images, question, images, history, system)

    def image_tokens_problem(self, images: list[Image.Image]) -> str | None:
        """Why `images` cannot be read in one request, or None: their placeholders (anyres: each image's own
        count, from its size and the pinpoints) must leave room for a question and an answer in the context.
        The one place serving decides an image's size limit in tokens; pixels are limited by `--max-image-pixels`."""
        counts = self.images.counts(images)
        if sum(counts) < self.context:
            return None
        sizes = ", ".join(f"{image.width}x{image.height}: {count}" for image, count in zip(images, counts))
        return (f"{len(images)} image(s) need {sum(counts)} image tokens ({sizes}); the model holds {self.context} "
                f"(an image takes at most {self.images.max_image_tokens})")

    def describe(self) -> str:
        """The checkpoint kind and template, for logs and the chat page."""
        described = f"{self.loaded.kind} checkpoint, template {self.template.name}"
        if self.images.anyres:
            described += f", anyres: up to {self.images.max_image_tokens} tokens per image of {self.context}"
        return described
