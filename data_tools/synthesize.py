"""A deterministic synthetic VQA + caption set of coloured shapes (the demo's built-in data).

    python -m data_tools.synthesize --out-dir data/shapes --num-images 500 --image-size 64 --seed 0 \
        [--layout random|grid] [--objects distinct|alike]
        [--question-types color shape count presence position caption] [same-color]
    python -m data_tools.synthesize --variant small-objects ...   # one small shape per image (small_objects.py)
    python -m data_tools.synthesize --variant highres ...   # 1-3 tiny shapes in a large image (highres.py)

Each image holds 1-3 large shapes on a plain white background, at random non-overlapping
positions (or one per cell of a 2x2 grid with --layout grid). With `--objects distinct` (default)
each object has its own colour and its own shape; with `--objects alike` all objects of an image
share one colour and one shape (no colour-to-shape binding to learn: what a model trained from
scratch in minutes can master). Every image gives single-turn `color`, `shape`, `count`,
`presence` (with alike objects two: a "yes" and a "no" about the same picture), `position`
(distinct objects only) questions and a `caption` (--question-types picks some). Each record
carries `scene` (what the picture shows) for `partition --stratify scene`. On request,
`same-color` adds a question about two images, "Do the two images show the same colour?"
(`--objects alike` or `--variant highres`; data_tools/pairs.py).

The answers are balanced per question type by construction: for each type a schedule holds every
possible answer equally often (shuffled), and the image is drawn to make the scheduled answer
true. A model therefore cannot beat chance by answering the most frequent answer, and must bind
colour to shape (e.g. "Is there a blue circle?" is asked about a blue object and a circle that are
not the same object when the answer is "no" and the image has two objects or more).

Same arguments -> byte-identical PNGs and `dataset.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random

from .highres import DEFAULT_QUESTION_TYPES as HIGHRES_QUESTION_TYPES
from .highres import synthesize_highres
from .io import DataToolError, add_report_argument, cli_errors, write_json, write_report
from .pairs import SAME_COLOR, TWO_IMAGE_QUESTION_TYPES, same_color_records
from .records import CAPTION_PROMPT
from .shapes import (COLORS, POSITION_MARGIN, SHAPES, ShapeObject, balanced, caption_for, check_sizes, draw_scene,
                     shape_record)
from .small_objects import DEFAULT_QUESTION_TYPES, synthesize_small_objects

COUNTS = (1, 2, 3)
QUESTION_TYPES = ("color", "shape", "count", "presence", "position", "caption")
# Shapes are large (30% of the side) so a tiny vision tower sees them at 64x64.
OBJECT_FRACTION = 0.3
MIN_IMAGE_SIZE = 16
LAYOUTS = ("random", "grid")
VARIANTS = ("scenes", "small-objects", "highres")
OBJECT_KINDS = ("distinct", "alike")
GRID = 2  # cells per side of the grid layout


def _place_on_grid(rng: random.Random, count: int, size: int, side: int, anchored: int,
                   anchored_side: str) -> list[tuple]:
    """Top-left corners of objects in distinct cells of a 2x2 grid, each shifted at random inside its cell
    (so that a few hundred images are not the same few dozen pictures), never touching a neighbour."""
    cell = size // GRID
    column = 0 if anchored_side == "left" else GRID - 1
    anchored_cell = (column, rng.randrange(GRID))
    others = [(c, r) for r in range(GRID) for c in range(GRID) if (c, r) != anchored_cell]
    cells = rng.sample(others, count - 1)
    cells.insert(anchored, anchored_cell)
    return [(c * cell + rng.randint(1, cell - side - 1), r * cell + rng.randint(1, cell - side - 1)) for c, r in cells]


def _place(rng: random.Random, count: int, size: int, side: int, anchored: int, anchored_side: str) -> list[tuple]:
    """Random non-overlapping top-left corners; object `anchored` lies clearly on `anchored_side`."""
    gap = max(1, size // 32)
    low, high = 1, size - side - 1
    margin = POSITION_MARGIN * size
    for _ in range(1000):
        corners: list[tuple[int, int]] = []
        for index in range(count):
            for _ in range(200):
                x, y = rng.randint(low, high), rng.randint(low, high)
                center = x + (side - 1) / 2
                if index == anchored:
                    wanted = center <= size / 2 - margin if anchored_side == "left" else center >= size / 2 + margin
                    if not wanted:
                        continue
                if all(x + side + gap <= ox or ox + side + gap <= x or y + side + gap <= oy or oy + side + gap <= y
                       for ox, oy in corners):
                    corners.append((x, y))
                    break
            else:
                break
        if len(corners) == count:
            return corners
    raise DataToolError(f"cannot place {count} shapes of {side}px in a {size}px image; use a larger --image-size")


def _scene(rng: random.Random, size: int, count: int, color_answer: str, shape_answer: str,
           position_answer: str, layout: str, alike: bool) -> tuple[list[ShapeObject], int, int, int]:
    """Objects making the scheduled answers true, and which object each question is about."""
    color_target, shape_target, position_target = (rng.randrange(count) for _ in range(3))
    if alike:
        colors, shapes = [color_answer] * count, [shape_answer] * count
    else:
        others = [c for c in COLORS if c != color_answer]
        rng.shuffle(others)
        colors = others[: count - 1]
        colors.insert(color_target, color_answer)
        other_shapes = [s for s in SHAPES if s != shape_answer]
        rng.shuffle(other_shapes)
        shapes = other_shapes[: count - 1]
        shapes.insert(shape_target, shape_answer)
    if layout == "grid":
        cell = size // GRID
        side = cell - 2 * max(1, round(cell * 0.1))  # one large object per cell
        corners = _place_on_grid(rng, count, size, side, position_target, position_answer)
    else:
        side = max(4, round(size * OBJECT_FRACTION))
        corners = _place(rng, count, size, side, position_target, position_answer)
    objects = [ShapeObject(c, s, x, y, side) for c, s, (x, y) in zip(colors, shapes, corners)]
    return objects, color_target, shape_target, position_target


def synthesize(out_dir: str, num_images: int = 500, image_size: int = 64, seed: int = 0, layout: str = "random",
               question_types=QUESTION_TYPES, objects: str = "distinct") -> str:
    """Write `out_dir/images/*.png` and `out_dir/dataset.json`; return the dataset path.

    `layout` "random" puts objects anywhere (not overlapping), "grid" in the cells of a 2x2 grid.
    `objects` "distinct" gives each object its own colour and shape, "alike" one colour and shape per image.
    Only records of `question_types` are written; the images do not depend on that choice. The
    same arguments give byte-identical files.
    """
    unknown = sorted(set(question_types) - set(QUESTION_TYPES) - set(TWO_IMAGE_QUESTION_TYPES))
    if unknown or not question_types:
        raise DataToolError(f"question types {unknown or '(none)'}; expected some of "
                            f"{list(QUESTION_TYPES + TWO_IMAGE_QUESTION_TYPES)}")
    if layout not in LAYOUTS:
        raise DataToolError(f"layout {layout!r}; expected one of {list(LAYOUTS)}")
    if objects not in OBJECT_KINDS:
        raise DataToolError(f"objects {objects!r}; expected one of {list(OBJECT_KINDS)}")
    alike = objects == "alike"
    if alike and "position" in question_types:
        raise DataToolError("position questions need distinct objects (with --objects alike the question "
                            "'is the red square on the left?' can have several answers); drop 'position'")
    if not alike and SAME_COLOR in question_types:
        raise DataToolError(f"'{SAME_COLOR}' questions need --objects alike (one colour per image); with distinct "
                            "objects an image has several colours")
    check_sizes(num_images, image_size, MIN_IMAGE_SIZE)
    rng = random.Random(seed)
    # One balanced schedule per question type, each answer equally frequent.
    counts = balanced(COUNTS, num_images, rng)
    color_answers = balanced(COLORS, num_images, rng)
    shape_answers = balanced(SHAPES, num_images, rng)
    presence_answers = balanced(("yes", "no"), num_images, rng)
    position_answers = balanced(("left", "right"), num_images, rng)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records, coloured = [], []  # coloured: (image, its colour, scene) for the two-image questions
    for i in range(num_images):
        objects, color_t, shape_t, position_t = _scene(rng, image_size, counts[i], color_answers[i],
                                                       shape_answers[i], position_answers[i], layout, alike)
        image = f"images/{i:05d}.png"
        draw_scene(objects, image_size).save(os.path.join(out_dir, image), format="PNG")
        present = {(o.color, o.shape) for o in objects}
        scene = caption_for(objects).removesuffix(".")
        presence = []  # (asked pair, answer)
        if alike:
            # Both answers about every image, the scheduled one first: the same picture answers "yes" to
            # its own pair and "no" to any other (asked pairs are uniform over all pairs either way, so the
            # question's words tell nothing about the answer).
            other = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
            both = {"yes": (objects[0].color, objects[0].shape), "no": other}
            order = ("yes", "no") if presence_answers[i] == "yes" else ("no", "yes")
            presence = [(both[answer], answer) for answer in order]
        elif presence_answers[i] == "yes":
            asked = rng.choice(objects)
            presence = [((asked.color, asked.shape), "yes")]
        else:
            # Prefer a colour and a shape that are both in the image but on different objects.
            unbound = [(a.color, b.shape) for a in objects for b in objects if a is not b]
            presence = [(rng.choice(unbound or sorted(set((c, s) for c in COLORS for s in SHAPES) - present)), "no")]
        positioned = objects[position_t]
        if alike:
            color_question, shape_question = "What color are the objects?", "What shape are the objects?"
        else:
            color_question = f"What color is the {objects[color_t].shape}?"
            shape_question = f"What shape is the {objects[shape_t].color} object?"
        records += [record for record in [
            shape_record(i, image, "color", color_question, objects[color_t].color, scene),
            shape_record(i, image, "shape", shape_question, objects[shape_t].shape, scene),
            shape_record(i, image, "count", "How many objects are there?", str(len(objects)), scene),
            *[shape_record(i, image, "presence", f"Is there a {c} {s}?", answer, scene, f"-{n + 1}" if n else "")
              for n, ((c, s), answer) in enumerate(presence)],
            shape_record(i, image, "position", f"Is the {positioned.color} {positioned.shape} on the left or the right?",
                    positioned.side_of_image(image_size), scene),
            shape_record(i, image, "caption", CAPTION_PROMPT, caption_for(objects), scene),
        ] if record["question_type"] in question_types]
        coloured.append((image, objects[0].color, scene))
    if SAME_COLOR in question_types:
        records += same_color_records(coloured, seed)
    path = os.path.join(out_dir, "dataset.json")
    write_json(path, records)
    return path


def answer_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """question_type -> answer -> count (captions excluded: every caption is its own answer)."""
    table: dict[str, dict[str, int]] = {}
    for record in records:
        if record.get("question_type") != "caption":
            answers = table.setdefault(record["question_type"], {})
            answer = record["conversations"][-1]["value"]
            answers[answer] = answers.get(answer, 0) + 1
    return {qtype: dict(sorted(answers.items())) for qtype, answers in table.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.synthesize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="writes OUT_DIR/images/*.png and OUT_DIR/dataset.json")
    parser.add_argument("--num-images", type=int, default=500, help="images to draw (6 records each; default 500)")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--layout", choices=LAYOUTS, default="random",
                        help="random: objects anywhere, not overlapping (default); grid: one object per cell of a "
                             "2x2 grid (fewer distinct positions: easier to learn)")
    parser.add_argument("--objects", choices=OBJECT_KINDS, default="distinct",
                        help="distinct: each object its own colour and shape (default); alike: all objects of an "
                             "image share one colour and one shape (no binding to learn)")
    parser.add_argument("--question-types", nargs="+", choices=QUESTION_TYPES + TWO_IMAGE_QUESTION_TYPES,
                        default=None, metavar="TYPE",
                        help=f"records to write (default all: {' '.join(QUESTION_TYPES)}; small-objects: color "
                             f"shape presence position; highres: color shape count presence); {SAME_COLOR}: "
                             "'Do the two images show the same colour?' about two images (--objects alike, highres)")
    parser.add_argument("--variant", choices=VARIANTS, default="scenes",
                        help="scenes: 1-3 large shapes (default); small-objects: one small shape at a random "
                             "position, --layout and --objects do not apply (data_tools/small_objects.py); highres: "
                             "1-3 alike shapes of 1/16 of the side, for --image-size 128 or 256 "
                             "(data_tools/highres.py)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR/dataset.json")
    add_report_argument(parser)
    return parser


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    existing = os.path.join(args.out_dir, "dataset.json")
    if os.path.exists(existing) and not args.overwrite:
        raise DataToolError(f"{existing} already exists; pass --overwrite to replace it")
    if args.variant == "small-objects":
        args.question_types = args.question_types or list(DEFAULT_QUESTION_TYPES)
        path = synthesize_small_objects(args.out_dir, args.num_images, args.image_size, args.seed, args.question_types)
    elif args.variant == "highres":
        args.question_types = args.question_types or list(HIGHRES_QUESTION_TYPES)
        path = synthesize_highres(args.out_dir, args.num_images, args.image_size, args.seed, args.question_types)
    else:
        args.question_types = args.question_types or list(QUESTION_TYPES)
        path = synthesize(args.out_dir, args.num_images, args.image_size, args.seed, args.layout,
                          args.question_types, args.objects)
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    counts = answer_counts(records)
    kind = {"small-objects": "one small object", "highres": "1-3 tiny alike objects"}.get(
        args.variant, f"{args.layout} layout, {args.objects} objects")
    print(f"wrote {len(records)} records for {args.num_images} images ({args.image_size}px, {kind}) to {path}")
    for qtype, answers in counts.items():
        print(f"  {qtype:9s} " + "  ".join(f"{a}={n}" for a, n in answers.items()))
    write_report(args.report, {"dataset": path, "num_images": args.num_images, "image_size": args.image_size,
                               "seed": args.seed, "variant": args.variant, "layout": args.layout, "objects": args.objects, "question_types": args.question_types,
                               "num_records": len(records), "answer_counts": counts})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
