"""Batched generation shared by `eval.generate`, the CLI and the merge/export checks.

Prompts are the exact ids training used (`tokenize_prompt`), left-padded with the tokenizer's pad
id so every row's last prompt token sits in the last column and the new tokens line up. Each image
takes the placeholders its model reads it with (`ImageReader`): a fixed count (LLaVA-1.5) or, for an anyres
(LLaVA-NeXT) model, its own count and tiles from its size, with `image_sizes`. Position
ids are passed explicitly (first real token = 0): `generate` derives them from the attention mask
only when the model's `forward` signature names `position_ids`, which a subclass taking `**kwargs`
hides, and then left-padded rows would be numbered from the padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from .anyres import AnyresTiling
from .conversation import IMAGE_TOKEN, get_template, marker_problem, stop_token_ids, tokenize_prompt
from .decoding import decode_answer
from .images import image_settings, preprocess_images
from .model.modeling import image_seq_length, unwrap_model
from .model.modeling_next import is_next


@dataclass
class Prompt:
    """One generation request: prompt ids (image placeholders already expanded) and its images, in
    the order of their placeholders."""

    input_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class GenerationSettings:
    """Decoding settings (LLaVA's eval flags). `temperature` 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    # None: as the model was trained (its config.json); else "pad"/"square"/"resize" and "white"/"mean"
    # (an anyres model reads tiles only: "anyres" or None)
    image_aspect_ratio: str | None = None
    image_background: str | None = None


@dataclass(frozen=True)
class ImageReader:
    """How a model turns images into placeholders and pixel inputs, the one place generation, serving and eval ask:
    `tokens` per image (LLaVA-1.5; 0 for a text-only model), or each image its own count and tiles (`anyres`, an
    anyres/LLaVA-NeXT model: `llava_tiny.anyres.AnyresTiling` of its pinpoints, tower and patch size)."""

    tokens: int
    anyres: AnyresTiling | None = None

    @classmethod
    def of(cls, loaded) -> "ImageReader":
        model = unwrap_model(loaded.model)
        if not is_next(model):
            return cls(image_seq_length(model))
        config = model.config
        return cls(0, AnyresTiling.for_tower(config.image_grid_pinpoints, loaded.image_processor,
                                             config.vision_config.patch_size))

    @property
    def reads_images(self) -> bool:
        return bool(self.tokens or self.anyres)

    @property
    def max_image_tokens(self) -> int:
        """The most placeholders one image can take (anyres: the largest pinpoint grid, whatever the image's pixels)."""
        return self.anyres.max_image_tokens if self.anyres else self.tokens

    def counts(self, images) -> list[int]:
        """The placeholders of each image, in order."""
        return [self.anyres.image_tokens(image) if self.anyres else self.tokens for image in images]

    def pixel_inputs(self, images, image_processor, config, aspect_ratio: str | None = None,
                     background: str | None = None) -> dict[str, torch.Tensor]:
        """`pixel_values` (and, anyres, `image_sizes`) of `images` in order, prepared as the model was trained
        (`aspect_ratio`/`background` None) or as asked."""
        self.check_aspect_ratio(aspect_ratio)
        aspect_ratio, background = image_settings(config, aspect_ratio, background)
        if self.anyres is None:
            return {"pixel_values": preprocess_images(images, image_processor, aspect_ratio, background)}
        return self.anyres.pixel_values(images, image_processor, background)

    def check_aspect_ratio(self, aspect_ratio: str | None) -> None:
        """An anyres model reads tiles only: another `--image-aspect-ratio` asked of it is refused."""
        if self.anyres is not None and aspect_ratio not in (None, "anyres"):
            raise ValueError(f"--image-aspect-ratio {aspect_ratio}: this anyres (LLaVA-NeXT) model reads images as "
                             "tiles only; leave the image aspect ratio as the model's own")


def template_name(loaded, conv_mode: str | None = None) -> str:
    """`conv_mode` if given (LLaVA's `--conv-mode`), else the template the checkpoint was trained with."""
    return get_template(conv_mode).name if conv_mode else loaded.template


def build_prompt(loaded, question: str, images: list[Image.Image] = (), history: list[tuple[str, str]] = (),
                 conv_mode: str | None = None, system: str | None = None) -> Prompt:
    """A `Prompt` for `question` after `history` turns (`system`: a sample's own system message, which replaces
    the template's); checks `<image>` markers against `images` (`checked_prompt`)."""
    return checked_prompt(loaded.tokenizer, template_name(loaded, conv_mode), ImageReader.of(loaded),
                          question, images, history, system)


def checked_prompt(tokenizer, template, reader: ImageReader, question: str, images: list[Image.Image] = (),
                   history: list[tuple[str, str]] = (), system: str | None = None) -> Prompt:
    """`build_prompt` for a template and `ImageReader` already resolved (the serving model resolves them once,
    `serve.served.ServedModel`). One `<image>` marker per image, in the images' order.

    A marker/image count mismatch would otherwise surface inside the forward as transformers' misleading
    "Image features and image tokens do not match".
    """
    markers = question.count(IMAGE_TOKEN) + sum(q.count(IMAGE_TOKEN) for q, _ in history)
    mismatch = marker_problem(markers, len(images))
    if mismatch:
        raise ValueError(f"prompt: {mismatch}")
    if images and not reader.reads_images:
        raise ValueError("prompt: images were given, but this model has no vision tower (a text-only model)")
    counts = reader.counts(images) if reader.reads_images else 0
    ids = tokenize_prompt(question, tokenizer, template, counts, history=list(history), system=system)
    return Prompt(input_ids=ids, images=list(images))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` and `position_ids` for left-padded rows.

    Positions count real tokens only (padding gets 0), exactly what the same row alone would get.
    """
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _pad_id(loaded) -> int:
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id == getattr(unwrap_model(loaded.model).config, "image_token_index", None):
        # LLaVA finds image slots by id: padding with it would claim image features for pad positions.
        raise ValueError(f"the tokenizer pads with the image token id {pad_id}; set a different pad token")
    return pad_id


def _cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


@torch.inference_mode()
def generate_batch(loaded, prompts: list[Prompt], settings: GenerationSettings | None = None,
                   conv_mode: str | None = None) -> list[str]:
    """Generate one answer per prompt in a single left-padded `generate` call (KV cache on).

    Image and text-only prompts, and prompts of several images, can share a batch: `pixel_values` holds the
    images of all prompts in prompt order (anyres: each image's tiles, zero-padded to the most, and its
    `image_sizes`), and LLaVA fills the placeholders in that same order.
    """
    stops = stop_token_ids(loaded.tokenizer, template_name(loaded, conv_mode))
    return [decode_answer(loaded.tokenizer, _cut_at_stop(row, set(stops)))
            for row in generate_ids(loaded, prompts, stops, settings)]


@torch.inference_mode()
def generate_ids(loaded, prompts: list[Prompt], stop_ids: list[int], settings: GenerationSettings | None = None,
                 **generate_kwargs) -> list[list[int]]:
    """The new token ids of each prompt (stop and padding tokens included) from one left-padded `generate` call
    that ends a row at any of `stop_ids` (`conversation.stop_token_ids` of the template).

    `generate_kwargs` (a streamer, stopping criteria) go to `model.generate`: the serving engine
    streams and stops rows early through them.
    """
    settings = settings or GenerationSettings()
    if not prompts:
        return []
    if settings.num_beams > 1 and any(len(p.images) > 1 for p in prompts):
        # generate() expands pixel_values per image (x,x,y,y), not per sample (x,y,x,y): every beam
        # of a multi-image prompt would see the wrong images (transformers issue #37900).
        raise ValueError("beam search (num_beams > 1) with several images in one prompt is not supported: "
                         "transformers expands pixel_values per image, not per prompt; use num_beams 1")
    model = loaded.model
    llava = unwrap_model(model)
    device, dtype = llava.device, llava.dtype
    pad_id = _pad_id(loaded)
    input_ids, attention_mask, position_ids = left_pad([p.input_ids for p in prompts], pad_id)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
              "position_ids": position_ids.to(device)}
    images = [image for p in prompts for image in p.images]
    if images:
        pixels = ImageReader.of(loaded).pixel_inputs(images, loaded.image_processor, llava.config,
                                                     settings.image_aspect_ratio, settings.image_background)
        inputs["pixel_values"] = pixels.pop("pixel_values").to(device=device, dtype=dtype)
        inputs.update({name: value.to(device) for name, value in pixels.items()})
    sampling = settings.temperature > 0
    decoding = {"do_sample": sampling, "num_beams": settings.num_beams}
    if sampling:
        decoding["temperature"] = settings.temperature
        if settings.top_p is not None:
            decoding["top_p"] = settings.top_p
    else:  # stop a saved generation_config's sampling defaults from producing warnings
        decoding.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, eos_token_id=list(stop_ids),
                            pad_token_id=pad_id, use_cache=True, **decoding, **generate_kwargs)
    return output[:, input_ids.shape[1]:].tolist()


def probe_inputs(loaded, question: str = "<image>\nDescribe the image in detail.") -> dict[str, torch.Tensor]:
    """A fixed prompt and a synthetic (deterministic, non-uniform) image, for parity checks (the prompt
    without its image for a text-only model)."""
    llava = unwrap_model(loaded.model)
    reader = ImageReader.of(loaded)
    if not reader.reads_images:
        prompt = build_prompt(loaded, question.replace(IMAGE_TOKEN, "").strip())
        return {"input_ids": torch.tensor([prompt.input_ids], device=llava.device)}
    size = llava.config.vision_config.image_size
    # Anyres: wider than tall, so it takes several tiles and unpadding
    gradient = Image.linear_gradient("L").resize((size * 3 // 2 if reader.anyres else size, size))
    image = Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180)))
    prompt = build_prompt(loaded, question, [image])
    pixels = reader.pixel_inputs(prompt.images, loaded.image_processor, llava.config)
    pixels["pixel_values"] = pixels["pixel_values"].to(dtype=llava.dtype)
    return {"input_ids": torch.tensor([prompt.input_ids], device=llava.device),
            **{name: value.to(device=llava.device) for name, value in pixels.items()}}
