"""The high-resolution variant of `data_tools.synthesize`: a few tiny shapes in a large image.

    python -m data_tools.synthesize --variant highres --out-dir data/highres --num-images 2000 \
        --image-size 128 --seed 0 [--question-types color shape count presence]

Each image (128 or 256 px; at least 64) holds 1-3 shapes of one colour and one shape, each 1/16 of the
side (8 px at 128 px), at random positions at least one object apart (they stay separate blobs when the
image is scaled down). Squeezed into one 32-px tower view (`--image_aspect_ratio pad`) an 8-px shape
becomes 2 px and its shape is lost; LLaVA-NeXT's anyres tiles (`llava_tiny/anyres.py`) keep it several
pixels wide. That is the difference this set measures (issue 24).

Every image gives a `color` ("What color are the shapes?"), a `shape` ("What shape are the shapes?"), a
`count` ("How many shapes are there?") question and two `presence` questions ("Is there a red circle?"),
one answered "yes" about the shapes drawn and one "no" about another of the 12 colour-shape pairs, in
random order; `caption` ("two red circles.") on request. Colour, shape and count follow balanced
schedules (every answer equally often), so the majority class is chance, and no question's words tell
its answer. `same-color` (on request) asks about two images, "Do the two images show the same colour?"
(data_tools/pairs.py). Same arguments -> byte-identical files.
"""
from __future__ import annotations

import os
import random

from .io import DataToolError, write_json
from .pairs import SAME_COLOR, TWO_IMAGE_QUESTION_TYPES, same_color_records
from .records import CAPTION_PROMPT
from .shapes import (COLORS, SHAPES, ShapeObject, balanced, caption_for, check_sizes, draw_scene, shape_record,
                     variant_records)

QUESTION_TYPES = ("color", "shape", "count", "presence", "caption", *TWO_IMAGE_QUESTION_TYPES)
DEFAULT_QUESTION_TYPES = ("color", "shape", "count", "presence")
COUNTS = (1, 2, 3)
OBJECT_FRACTION = 1 / 16  # 8 px at 128 px: 2 px once squeezed into a 32-px tower view
MIN_OBJECT_SIDE = 4
MIN_IMAGE_SIZE = 64
SOURCE = "synthetic-highres"


def place_apart(rng: random.Random, count: int, size: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners of `count` objects of `side` px, at least one object's side apart from each other (and
    one pixel from the border), so each stays its own blob in a scaled-down view."""
    for _ in range(1000):
        corners: list[tuple[int, int]] = []
        for _ in range(count):
            x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            if all(x + 2 * side <= ox or ox + 2 * side <= x or y + 2 * side <= oy or oy + 2 * side <= y
                   for ox, oy in corners):
                corners.append((x, y))
        if len(corners) == count:
            return corners
    raise DataToolError(f"cannot place {count} shapes of {side}px apart in a {size}px image; use a larger --image-size")


def synthesize_highres(out_dir: str, num_images: int = 2000, image_size: int = 128, seed: int = 0,
                       question_types=DEFAULT_QUESTION_TYPES) -> str:
    """Write `out_dir/images/*.png` and `out_dir/dataset.json` of the highres variant; return the dataset path.

    Only records of `question_types` (some of `QUESTION_TYPES`) are written; the images do not depend on that
    choice.
    """
    unknown = sorted(set(question_types) - set(QUESTION_TYPES))
    if unknown or not question_types:
        raise DataToolError(f"highres question types {unknown or '(none)'}; expected some of {list(QUESTION_TYPES)} "
                            "(the shapes of an image are alike: no position questions)")
    check_sizes(num_images, image_size, MIN_IMAGE_SIZE)
    rng = random.Random(seed)
    counts = balanced(COUNTS, num_images, rng)
    colors = balanced(COLORS, num_images, rng)
    shapes = balanced(SHAPES, num_images, rng)
    yes_first = balanced((True, False), num_images, rng)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    side = max(MIN_OBJECT_SIDE, round(image_size * OBJECT_FRACTION))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records, coloured = [], []  # coloured: (image, its colour, scene) for the two-image questions
    for i in range(num_images):
        objects = [ShapeObject(colors[i], shapes[i], x, y, side)
                   for x, y in place_apart(rng, counts[i], image_size, side)]
        image = f"images/{i:05d}.png"
        draw_scene(objects, image_size).save(os.path.join(out_dir, image), format="PNG")
        other = rng.choice([pair for pair in pairs if pair != (colors[i], shapes[i])])
        presence = [((colors[i], shapes[i]), "yes"), (other, "no")]
        if not yes_first[i]:
            presence.reverse()
        caption = caption_for(objects)
        scene = caption.removesuffix(".")
        batch = [
            shape_record(i, image, "color", "What color are the shapes?", colors[i], scene),
            shape_record(i, image, "shape", "What shape are the shapes?", shapes[i], scene),
            shape_record(i, image, "count", "How many shapes are there?", str(counts[i]), scene),
            *[shape_record(i, image, "presence", f"Is there a {c} {s}?", answer, scene, f"-{n + 1}" if n else "")
              for n, ((c, s), answer) in enumerate(presence)],
            shape_record(i, image, "caption", CAPTION_PROMPT, caption, scene),
        ]
        records += variant_records(batch, question_types, "highres", SOURCE)
        coloured.append((image, colors[i], scene))
    if SAME_COLOR in question_types:
        records += variant_records(same_color_records(coloured, seed), question_types, "highres", SOURCE)
    path = os.path.join(out_dir, "dataset.json")
    write_json(path, records)
    return path
