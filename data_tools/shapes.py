"""What the synthetic sets draw and write: coloured shapes, their captions and their records.

Shared by the scenes set (synthesize.py) and the small-objects set (small_objects.py).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .io import DataToolError

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (255, 255, 255)
SOURCE = "synthetic-shapes"
# an object asked about in a position question sits at least 10% of the side away from the vertical midline
POSITION_MARGIN = 0.1


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    x: int  # top-left corner of the object's square bounding box
    y: int
    side: int

    @property
    def center_x(self) -> float:
        return self.x + (self.side - 1) / 2

    def side_of_image(self, image_size: int) -> str:
        return "left" if self.center_x < image_size / 2 else "right"


def balanced(values, n: int, rng: random.Random) -> list:
    """`n` draws where every value occurs equally often (up to one), in random order."""
    values = list(values)
    schedule = (values * math.ceil(n / len(values)))[:n]
    rng.shuffle(schedule)
    return schedule


def draw_scene(objects: list[ShapeObject], size: int) -> Image.Image:
    """Draw the objects without anti-aliasing, so every object pixel has its exact colour."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj.x, obj.y, obj.x + obj.side - 1, obj.y + obj.side - 1
        fill = COLORS[obj.color]
        if obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def caption_for(objects: list[ShapeObject]) -> str:
    """A caption such as "a red square, a green triangle and a blue circle." (left to right, then top down),
    or "two red squares." when all objects are alike."""
    if len(objects) > 1 and len({(o.color, o.shape) for o in objects}) == 1:
        return f"{NUMBER_WORDS[len(objects)]} {objects[0].color} {objects[0].shape}s."
    names = [f"a {o.color} {o.shape}" for o in sorted(objects, key=lambda o: (o.center_x, o.y))]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text + "."


def shape_record(image_index: int, image: str, question_type: str, question: str, answer: str, scene: str,
            suffix: str = "") -> dict:
    return {
        "id": f"shapes-{image_index:05d}-{question_type}{suffix}",
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
        "question_type": question_type,
        "answer_type": "closed" if answer in ("yes", "no") else "open",
        "references": [answer],
        "source": SOURCE,
        "scene": scene,  # what the picture shows: `partition --stratify scene` balances the splits
    }


def variant_records(batch: list[dict], question_types, id_prefix: str, source: str) -> list[dict]:
    """The records of `batch` (from `shape_record`) whose type is in `question_types`, renamed for a variant:
    ids `{id_prefix}-...` instead of `shapes-...`, and the variant's `source`."""
    kept = []
    for record in batch:
        if record["question_type"] in question_types:
            record["id"] = record["id"].replace("shapes-", f"{id_prefix}-", 1)
            record["source"] = source
            kept.append(record)
    return kept


def check_sizes(num_images: int, image_size: int, minimum: int) -> None:
    """DataToolError unless there is an image to draw and the side is at least `minimum` pixels."""
    if num_images < 1:
        raise DataToolError(f"--num-images must be at least 1, got {num_images}")
    if image_size < minimum:
        raise DataToolError(f"--image-size must be at least {minimum} pixels, got {image_size}")
