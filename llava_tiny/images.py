"""Image loading and preprocessing shared by training, evaluation and the CLI."""
from __future__ import annotations

import os

from PIL import Image

ASPECT_RATIOS = ("pad", "square", "resize")
IMAGE_BACKGROUNDS = ("white", "mean")  # what transparent pixels become (`--image_background`)


class ImagePathError(ValueError):
    """An image path that escapes the image folder (refused unless explicitly allowed)."""


def resolve_image_path(relative: str, image_folder: str | None, allow_outside: bool = False) -> str:
    """Join `relative` to `image_folder`, refusing `../` escapes and absolute paths by default."""
    if image_folder is None:
        return relative
    root = os.path.realpath(image_folder)
    path = os.path.realpath(os.path.join(root, relative))
    if not allow_outside and os.path.commonpath([root, path]) != root:
        raise ImagePathError(f"image path {relative!r} escapes the image folder {image_folder!r}; "
                             "pass --allow_images_outside_folder to allow it")
    return path


def has_alpha(image: Image.Image) -> bool:
    """True when the image can hold transparent pixels: an alpha channel, or a transparent palette/colour entry."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def load_image(path: str) -> Image.Image:
    """Open and fully decode an image (a truncated file fails here, not later).

    The result is RGB, or RGBA when the file has transparency: `preprocess_images` composites it onto
    the chosen background, so every user of an image (training, generation, the CLI, the server)
    gets the same pixels.
    """
    with Image.open(path) as img:
        img.load()
        return img.convert("RGBA" if has_alpha(img) else "RGB")


def background_colour(background: str, image_processor) -> tuple[int, int, int]:
    """The RGB colour under transparent pixels: `white`, or `mean` (the processor's mean colour, ~0 after
    normalisation, the colour `--image_aspect_ratio pad` pads with)."""
    if background == "white":
        return (255, 255, 255)
    if background == "mean":
        return tuple(int(round(x * 255)) for x in image_processor.image_mean)
    raise ValueError(f"image background {background!r}; expected one of {IMAGE_BACKGROUNDS}")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The one place an image becomes RGB: transparent pixels are composited onto `background`.

    A plain `convert("RGB")` would show whatever colour the file stores under its transparent pixels
    (often black or leftover garbage around a cut-out object).
    """
    if image.mode == "RGB":
        return image
    if not has_alpha(image):
        return image.convert("RGB")
    canvas = Image.new("RGBA", image.size, (*background, 255))
    canvas.alpha_composite(image.convert("RGBA"))
    return canvas.convert("RGB")


def tower_image_size(image_processor) -> tuple[int, int]:
    """(width, height) of what the tower sees: its crop size when it crops, else its resize size."""
    crops = getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None)
    size = image_processor.crop_size if crops else image_processor.size
    if "height" in size:
        return size["width"], size["height"]
    side = size.get("shortest_edge") or size.get("longest_edge")
    return side, side


# The settings of an image processor that decide its pixels (all of them `LlavaImageProcessor` settings).
_PIXEL_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                   "do_normalize", "image_mean", "image_std")


def tower_pixel_settings(image_processor) -> dict:
    """The settings of the tower's own processor that decide its pixels, as keyword arguments for a stock
    LLaVA image processor (`LlavaImageProcessor`, `LlavaNextImageProcessor`)."""
    settings = {k: v for k, v in image_processor.to_dict().items() if k in _PIXEL_SETTINGS and v is not None}
    settings.setdefault("do_center_crop", False)  # SigLIP has no crop; the LLaVA processors would crop by default
    return settings


def processor_for_aspect_ratio(image_processor, aspect_ratio: str = "pad"):
    """The stock `LlavaImageProcessor` that prepares images for the vision tower as `--image_aspect_ratio`
    says, from the tower's own processor (CLIP: resize the short side + centre crop; SigLIP: resize):

    `pad`: pad to a square in int(mean * 255), image centred, then the tower's resize (LLaVA-1.5's
    `expand2square`; `do_pad`); `square`: resize to the tower's square size, ignoring the aspect ratio;
    `resize`: the tower's own resize (+ centre crop).

    Training, inference and the saved folder all use this one processor, so stock readers of a saved
    folder (transformers' `AutoProcessor`, lmms-eval, vLLM, SGLang) prepare an image exactly as training did.
    """
    from transformers import LlavaImageProcessor  # falls back to its PIL twin without torchvision

    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio {aspect_ratio!r}; expected one of {ASPECT_RATIOS}")
    settings = tower_pixel_settings(image_processor)
    if aspect_ratio == "square":
        width, height = tower_image_size(image_processor)
        settings.update(size={"height": height, "width": width}, do_center_crop=False)
    return LlavaImageProcessor(**settings, do_pad=aspect_ratio == "pad", do_convert_rgb=True)


def preprocess_images(images: list[Image.Image], image_processor, aspect_ratio: str = "pad",
                      background: str = "white"):
    """`pixel_values` for the vision tower: transparent pixels composited onto `background` (`white`, as
    stock processors do, or `mean`, see `to_rgb`), then `processor_for_aspect_ratio`'s processor."""
    colour = background_colour(background, image_processor)
    images = [to_rgb(img, colour) for img in images]
    return processor_for_aspect_ratio(image_processor, aspect_ratio)(images=images, return_tensors="pt")["pixel_values"]


def image_settings(config, aspect_ratio: str | None = None, background: str | None = None) -> tuple[str, str]:
    """(`image_aspect_ratio`, `image_background`) for a model: the ones asked for, else those its config
    recorded in training (LLaVA-1.5's `pad` and white for folders that record none)."""
    return (aspect_ratio or getattr(config, "image_aspect_ratio", None) or "pad",
            background or getattr(config, "image_background", None) or "white")


def add_image_flags(parser) -> None:
    """`--image-aspect-ratio` and `--image-background`, the same for every command that reads images."""
    parser.add_argument("--image-aspect-ratio", "--image_aspect_ratio", choices=ASPECT_RATIOS, default=None,
                        help="default: the model's own (image_aspect_ratio in its config.json, pad if none)")
    parser.add_argument("--image-background", "--image_background", choices=IMAGE_BACKGROUNDS, default=None,
                        help="what transparent pixels become: white, or the processor's mean colour (default: the "
                             "model's own, image_background in its config.json, white if none)")
