"""The small-objects variant of `data_tools.synthesize`: one small shape at a random position.

    python -m data_tools.synthesize --variant small-objects --out-dir data/small --num-images 3000 \
        --image-size 64 --seed 0 [--question-types color shape presence position]

Each image holds a single shape whose side is 3/16 of the image (12 px at 64 px: under a 16-px patch)
anywhere on a white background, clearly left or right of the vertical midline. Every image gives a
`color` ("What color is the shape?"), a `shape` ("What shape is the object?"), a `position` ("Is
the red circle on the left or the right?") question and two `presence` questions ("Is there a red
circle?"), one answered "yes" about the shape drawn and one "no" about another of the 12
colour-shape pairs, in random order: the same picture answers both, and the pairs asked are uniform
over all pairs for either answer, so a question's words tell nothing about its answer. Colour, shape
and side follow balanced schedules (every answer equally often), so the majority class is chance.

What it tests: a from-scratch vision tower has to find a few dozen pixels in an image of thousands
(issue 23: with the demo's 16-px patches shape stayed near chance). Same arguments -> byte-identical
files.
"""
from __future__ import annotations

import os
import random

from .io import DataToolError, write_json
from .records import CAPTION_PROMPT
from .shapes import (COLORS, POSITION_MARGIN, SHAPES, ShapeObject, balanced, caption_for, check_sizes, draw_scene,
                     shape_record, variant_records)

QUESTION_TYPES = ("color", "shape", "presence", "position", "caption")
DEFAULT_QUESTION_TYPES = ("color", "shape", "presence", "position")
OBJECT_FRACTION = 3 / 16  # 12 px at 64 px: smaller than one 16-px patch, four 4-px patches across
SOURCE = "synthetic-small-objects"
MIN_IMAGE_SIZE = 32


def place(rng: random.Random, size: int, side: int, position: str) -> tuple[int, int]:
    """A random top-left corner for a `side`-px object whose centre lies clearly on `position` ("left"/"right")."""
    margin = POSITION_MARGIN * size
    # centre = x + (side - 1) / 2 must stay at least `margin` away from the midline size / 2
    left_high = int((size / 2 - margin) - (side - 1) / 2)
    right_low = -int(-((size / 2 + margin) - (side - 1) / 2))  # ceil
    low, high = (1, left_high) if position == "left" else (right_low, size - side - 1)
    return rng.randint(low, high), rng.randint(1, size - side - 1)


def synthesize_small_objects(out_dir: str, num_images: int = 3000, image_size: int = 64, seed: int = 0,
                             question_types=DEFAULT_QUESTION_TYPES) -> str:
    """Write `out_dir/images/*.png` and `out_dir/dataset.json` of the small-objects variant; return the path.

    Only records of `question_types` (some of `QUESTION_TYPES`) are written; the images do not depend on
    that choice.
    """
    unknown = sorted(set(question_types) - set(QUESTION_TYPES))
    if unknown or not question_types:
        raise DataToolError(f"small-objects question types {unknown or '(none)'}; expected some of "
                            f"{list(QUESTION_TYPES)} (one object per image: no count questions)")
    check_sizes(num_images, image_size, MIN_IMAGE_SIZE)
    rng = random.Random(seed)
    colors = balanced(COLORS, num_images, rng)
    shapes = balanced(SHAPES, num_images, rng)
    positions = balanced(("left", "right"), num_images, rng)
    yes_first = balanced((True, False), num_images, rng)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    side = max(4, round(image_size * OBJECT_FRACTION))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(num_images):
        x, y = place(rng, image_size, side, positions[i])
        obj = ShapeObject(colors[i], shapes[i], x, y, side)
        image = f"images/{i:05d}.png"
        draw_scene([obj], image_size).save(os.path.join(out_dir, image), format="PNG")
        other = rng.choice([pair for pair in pairs if pair != (obj.color, obj.shape)])
        presence = [((obj.color, obj.shape), "yes"), (other, "no")]
        if not yes_first[i]:
            presence.reverse()
        scene = f"{obj.color} {obj.shape}"
        batch = [
            shape_record(i, image, "color", "What color is the shape?", obj.color, scene),
            shape_record(i, image, "shape", "What shape is the object?", obj.shape, scene),
            *[shape_record(i, image, "presence", f"Is there a {c} {s}?", answer, scene, f"-{n + 1}" if n else "")
              for n, ((c, s), answer) in enumerate(presence)],
            shape_record(i, image, "position", f"Is the {obj.color} {obj.shape} on the left or the right?",
                    obj.side_of_image(image_size), scene),
            shape_record(i, image, "caption", CAPTION_PROMPT, caption_for([obj]), scene),
        ]
        records += variant_records(batch, question_types, "small", SOURCE)
    path = os.path.join(out_dir, "dataset.json")
    write_json(path, records)
    return path
