"""LLaVA-NeXT's "anyres" geometry: grid pinpoints, the best resolution, tiles + overview, image tokens.

An image is resized (aspect ratio kept) and padded to the pinpoint resolution that keeps most of its
pixels, cut into tower-sized tiles, and preceded by an overview: the whole image squeezed to one tile.
Under `--mm_patch_merge_type spatial_unpad` the tiles' patch features are laid out as one grid, the rows
(or columns) that only saw padding are dropped, an `image_newline` ends each row, and the overview's
patches come first. So an image takes

    unpadded rows x unpadded columns  +  unpadded rows  +  (tile_size / patch_size)^2

placeholders (CLS dropped, as everywhere in this project), the count stock `LlavaNextProcessor` expands
`<image>` to.

Pinpoints are [height, width] pairs, the order stock transformers reads `image_grid_pinpoints` in (the
folder we save is read by stock transformers). LLaVA-NeXT's own code reads each pair as [width, height];
the two agree on the symmetric sets LLaVA-NeXT ships ([[336, 672], [672, 336], ...] and the ranges).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from .images import background_colour, to_rgb, tower_image_size, tower_pixel_settings

# LLaVA-NeXT's range form: "(1x1),...,(3x3)" means every grid from 1x1 to 3x3 tiles.
_RANGE = re.compile(r"\((\d+)x(\d+)\)")


class PinpointsError(ValueError):
    """`--image_grid_pinpoints` that cannot be used with this tower."""


def parse_grid_pinpoints(value, tile_size: int) -> list[list[int]]:
    """`--image_grid_pinpoints` as [[height, width], ...] in pixels, from either of LLaVA-NeXT's forms:

    an explicit list, "[[336,672],[672,336],[672,672]]" (or a list already); or the range form
    "(1x1),...,(3x3)": every grid from the first to the last, rows x columns, times `tile_size` (the tower's
    image size), as LLaVA-NeXT's train.py expands it. LLaVA-NeXT allows the range form only for towers of
    224-512 px; tiny test towers of 32 px are allowed here, as every size stock transformers can tile.

    Each side must be a positive multiple of `tile_size`: the model reads the grid as side // tile_size,
    so any other size would give features that do not line up with the tiles.
    """
    if isinstance(value, str) and "x" in value:
        ranges = _RANGE.findall(value)
        if not ranges:
            raise PinpointsError(f"--image_grid_pinpoints {value!r}: expected a list like [[336,672],[672,336]] "
                                 "or a range like (1x1),...,(3x3)")
        (first_rows, first_cols), (last_rows, last_cols) = map(int, ranges[0]), map(int, ranges[-1])
        pinpoints = [[rows * tile_size, cols * tile_size] for rows in range(first_rows, last_rows + 1)
                     for cols in range(first_cols, last_cols + 1)]
    elif isinstance(value, str):
        try:
            pinpoints = ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            raise PinpointsError(f"--image_grid_pinpoints {value!r}: not a list of [height, width] pairs ({error}); "
                                 "expected a list like [[336,672],[672,336]] or a range like (1x1),...,(3x3)") from None
    else:
        pinpoints = value
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise PinpointsError(f"--image_grid_pinpoints {value!r}: expected a non-empty list of [height, width] pairs "
                             "or a range like (1x1),...,(3x3)")
    checked = []
    for pair in pinpoints:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(side, int) and side > 0 and side % tile_size == 0 for side in pair)):
            raise PinpointsError(f"--image_grid_pinpoints {value!r}: pinpoint {pair!r} is not a [height, width] pair "
                                 f"of positive multiples of the tower's image size {tile_size}")
        checked.append([int(pair[0]), int(pair[1])])
    return checked


def anyres_flag_problems(image_aspect_ratio: str, image_grid_pinpoints, mm_patch_merge_type: str) -> list[str]:
    """Problems with LLaVA-NeXT's flags together (`--image_aspect_ratio anyres`, `--image_grid_pinpoints`,
    `--mm_patch_merge_type spatial_unpad`), each naming its flag; the pinpoints' sides are held to the tower's
    image size when the model is built (`parse_grid_pinpoints`)."""
    anyres, problems = image_aspect_ratio == "anyres", []
    if mm_patch_merge_type not in ("flat", "spatial_unpad"):
        problems.append(f"--mm_patch_merge_type {mm_patch_merge_type!r}: expected flat (LLaVA-1.5) or spatial_unpad "
                        "(with --image_aspect_ratio anyres)")
    elif anyres != (mm_patch_merge_type == "spatial_unpad"):
        # Stock LlavaNextModel always unpads and appends image_newline: a flat anyres would not load there.
        problems.append("--image_aspect_ratio anyres goes with --mm_patch_merge_type spatial_unpad (LLaVA-NeXT's "
                        f"layout, the one stock transformers reads); got {image_aspect_ratio} with {mm_patch_merge_type}")
    if anyres and not image_grid_pinpoints:
        problems.append("--image_aspect_ratio anyres needs --image_grid_pinpoints: a list like [[336,672],[672,336]] "
                        "or a range like (1x1),...,(3x3)")
    elif image_grid_pinpoints and not anyres:
        problems.append("--image_grid_pinpoints is used only with --image_aspect_ratio anyres")
    elif anyres:
        try:
            parse_grid_pinpoints(image_grid_pinpoints, 1)  # the form alone: the tower is not loaded yet
        except PinpointsError as error:
            problems.append(str(error))
    return problems


def best_resolution(width: int, height: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) an image of `width` x `height` is resized and padded to: the one that keeps
    most of its pixels, then wastes the fewest (stock transformers' `select_best_resolution`)."""
    # Imported here: transformers' image utilities import torch, seconds that `data_tools.stats` need not pay
    # until it counts anyres tokens.
    from transformers.image_processing_utils import select_best_resolution

    best_height, best_width = select_best_resolution((height, width), pinpoints)
    return best_height, best_width


def tile_grid(width: int, height: int, pinpoints: list[list[int]], tile_size: int) -> tuple[int, int]:
    """(rows, columns) of tower-sized tiles an image is cut into (the overview not counted)."""
    best_height, best_width = best_resolution(width, height, pinpoints)
    return best_height // tile_size, best_width // tile_size


def unpadded_feature_grid(width: int, height: int, grid_height: int, grid_width: int) -> tuple[int, int]:
    """(rows, columns) of the tiles' feature grid (`grid_height` x `grid_width` patches) once the rows or columns
    that only saw the padding around a `width` x `height` image are dropped.

    The arithmetic of transformers' `unpad_image` (which needs the feature tensor) and of the private
    `LlavaNextProcessor._get_unpadded_features` (which needs a processor with a tokenizer): counts are needed
    before either exists, from an image's header alone (`data_tools.stats`, the dataset's length bound).
    `tests/test_anyres.py` holds it to the stock processor's count for many sizes.
    """
    if width / height > grid_width / grid_height:  # wider than the grid: padding above and below
        new_height = int(round(height * (grid_width / width), 7))
        return grid_height - (grid_height - new_height) // 2 * 2, grid_width
    new_width = int(round(width * (grid_height / height), 7))
    return grid_height, grid_width - (grid_width - new_width) // 2 * 2


def anyres_num_image_tokens(width: int, height: int, pinpoints: list[list[int]], tile_size: int,
                            patch_size: int) -> int:
    """Placeholders for one `width` x `height` image under anyres + `spatial_unpad`: the unpadded grid of the
    tiles' patches, one newline per grid row, and the overview's (tile_size / patch_size)^2 patches."""
    patches_per_side = tile_size // patch_size
    rows, cols = tile_grid(width, height, pinpoints, tile_size)
    grid_rows, grid_cols = unpadded_feature_grid(width, height, rows * patches_per_side, cols * patches_per_side)
    return grid_rows * grid_cols + grid_rows + patches_per_side ** 2


def anyres_image_processor(image_processor, pinpoints: list[list[int]]):
    """The stock `LlavaNextImageProcessor` that tiles images as `pinpoints` say and prepares each tile (and the
    overview) exactly as the tower's own processor prepares an image: the processor a saved `llava_next`
    folder carries, so stock readers tile an image exactly as training did."""
    from transformers import LlavaNextImageProcessor  # falls back to its PIL twin without torchvision

    settings = tower_pixel_settings(image_processor)
    # The stock processor cuts tiles of its crop size, cropping or not: the tower's view, not the stock default
    # (224) for a tower without a crop (SigLIP) or an unused crop size. Without do_center_crop nothing is cropped.
    width, height = tower_image_size(image_processor)
    settings["crop_size"] = {"height": height, "width": width}
    return LlavaNextImageProcessor(**settings, image_grid_pinpoints=pinpoints, do_pad=True, do_convert_rgb=True)


def anyres_pixel_values(images, image_processor, pinpoints: list[list[int]], background: str = "white") -> dict:
    """{"pixel_values": [images, 1 + most tiles, 3, tile, tile], "image_sizes": [images, 2] (height, width)} for
    `LlavaNextForConditionalGeneration`: the overview then the tiles, row by row, of each image; images with
    fewer tiles are zero-padded (the model reads each image's own count from its size). Transparent pixels
    are composited onto `background` first, as `llava_tiny.images.preprocess_images` does."""
    colour = background_colour(background, image_processor)
    images = [to_rgb(image, colour) for image in images]
    features = anyres_image_processor(image_processor, pinpoints)(images=images, return_tensors="pt")
    return {"pixel_values": features["pixel_values"], "image_sizes": features["image_sizes"]}


def anyres_max_image_tokens(pinpoints: list[list[int]], tile_size: int, patch_size: int) -> int:
    """The most placeholders any image can take under `pinpoints`: the largest grid with nothing unpadded (an
    image of exactly that shape). A bound for checks that see no image: a sample that fits with it fits at any
    image size."""
    patches_per_side = tile_size // patch_size
    return max((height // patch_size) * (width // patch_size) + height // patch_size
               for height, width in pinpoints) + patches_per_side ** 2


@dataclass(frozen=True)
class AnyresTiling:
    """How one tower tiles images under `--image_aspect_ratio anyres`: the pinpoints, the tile side (the tower's
    image size) and the tower's patch size. What the dataset needs per image: its placeholder count and its
    tiles."""

    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    patch_size: int

    @classmethod
    def for_tower(cls, image_grid_pinpoints, image_processor, patch_size: int) -> AnyresTiling:
        """From `--image_grid_pinpoints` (either LLaVA-NeXT form), the tower's image processor and patch size."""
        width, height = tower_image_size(image_processor)
        if width != height or height % patch_size:
            raise PinpointsError(f"anyres needs a square tower view that patches of {patch_size} px divide; the "
                                 f"image processor gives {width}x{height}")
        pinpoints = parse_grid_pinpoints(image_grid_pinpoints, height)
        return cls(tuple(tuple(pair) for pair in pinpoints), height, patch_size)

    @property
    def max_image_tokens(self) -> int:
        return anyres_max_image_tokens(self._pinpoint_list, self.tile_size, self.patch_size)

    @property
    def _pinpoint_list(self) -> list[list[int]]:
        return [list(pair) for pair in self.pinpoints]

    def image_tokens(self, image) -> int:
        """Placeholders for one PIL image (`anyres_num_image_tokens` of its size)."""
        width, height = image.size
        return anyres_num_image_tokens(width, height, self._pinpoint_list, self.tile_size, self.patch_size)

    def pixel_values(self, images, image_processor, background: str = "white") -> dict:
        """`anyres_pixel_values` of `images` under these pinpoints."""
        return anyres_pixel_values(images, image_processor, self._pinpoint_list, background)
