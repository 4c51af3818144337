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


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, image centred, as LLaVA's `expand2square` (`--image_aspect_ratio pad`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _target_size(image_processor) -> tuple[int, int]:
    size = getattr(image_processor, "crop_size", None) or image_processor.size
    if "height" in size:
        return size["width"], size["height"]
    side = size.get("shortest_edge") or size.get("longest_edge")
    return side, side


def preprocess_images(images: list[Image.Image], image_processor, aspect_ratio: str = "pad",
                      background: str = "white"):
    """`pixel_values` for the vision tower.

    Transparent pixels are first composited onto `background` (`white` or `mean`, see `to_rgb`).
    `pad`: pad to square with the processor's mean colour, then resize (LLaVA-1.5);
    `square`: resize to the tower's square size, ignoring the aspect ratio;
    `resize`: the processor's own resize + centre crop.
    """
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio {aspect_ratio!r}; expected one of {ASPECT_RATIOS}")
    colour = background_colour(background, image_processor)
    images = [to_rgb(img, colour) for img in images]
    if aspect_ratio == "pad":
        mean = tuple(int(x * 255) for x in image_processor.image_mean)
        images = [expand_to_square(img, mean) for img in images]
    elif aspect_ratio == "square":
        images = [img.resize(_target_size(image_processor), Image.BICUBIC) for img in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def add_image_flags(parser) -> None:
    """`--image-aspect-ratio` and `--image-background`, the same for every command that reads images."""
    parser.add_argument("--image-aspect-ratio", "--image_aspect_ratio", choices=ASPECT_RATIOS, default="pad")
    parser.add_argument("--image-background", "--image_background", choices=IMAGE_BACKGROUNDS, default="white",
                        help="what transparent pixels become: white, or the processor's mean colour (default white)")
