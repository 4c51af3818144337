"""Questions that need two images, for `data_tools.synthesize` (`--question-types same-color`):

    python -m data_tools.synthesize --out-dir data/pairs --objects alike --question-types color same-color
    python -m data_tools.synthesize --variant highres --out-dir data/pairs-hr --question-types same-color

"Do the two images show the same colour?" about an image and a partner image, LLaVA-style: the record's `image` is
a list of the two paths and its question holds two `<image>` markers, one per image, in that order. It is asked of
images whose objects share one colour (`--objects alike`, the highres variant), so the answer is the colour of
each image. The answers follow a balanced schedule ("yes" and "no" equally often, in random order), and which
image comes first is random, so neither the question nor the order tells the answer; each image of the set is
asked about once, with a partner of its own colour ("yes") or of another colour ("no").
"""
from __future__ import annotations

import random
from collections import defaultdict

from .io import DataToolError
from .shapes import balanced, shape_record

SAME_COLOR = "same-color"
TWO_IMAGE_QUESTION_TYPES = (SAME_COLOR,)
SAME_COLOR_QUESTION = "Do the two images show the same colour?"


def same_color_records(images: list[tuple[str, str, str]], seed: int) -> list[dict]:
    """One "same colour?" record per image of `images` ((path, colour of its objects, scene) each), in
    `shape_record`'s form with a list of two images; drawn from a random stream of its own, so adding these
    records leaves the set's other records as they were."""
    rng = random.Random(f"{seed}-{SAME_COLOR}")
    by_colour: dict[str, list[int]] = defaultdict(list)
    for index, (_, colour, _) in enumerate(images):
        by_colour[colour].append(index)
    records = []
    for index, answer in enumerate(balanced(("yes", "no"), len(images), rng)):
        path, colour, scene = images[index]
        if answer == "yes":
            partners = [j for j in by_colour[colour] if j != index]
        else:
            partners = [j for other, indices in sorted(by_colour.items()) if other != colour for j in indices]
        if not partners:
            raise DataToolError(f"a '{SAME_COLOR}' question about image {path} needs another image of "
                                f"{'the same' if answer == 'yes' else 'another'} colour; use more --num-images")
        partner = rng.choice(partners)
        pair = [index, partner] if rng.random() < 0.5 else [partner, index]
        record = shape_record(index, path, SAME_COLOR, SAME_COLOR_QUESTION, answer,
                              " | ".join(images[i][2] for i in pair))
        record["image"] = [images[i][0] for i in pair]
        record["conversations"][0]["value"] = "<image>\n<image>\n" + SAME_COLOR_QUESTION
        records.append(record)
    return records
