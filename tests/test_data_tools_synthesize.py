"""data_tools.synthesize: byte-identical output, balanced answers, answers that match the pixels."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_tools import synthesize as synth
from data_tools.synthesize import COLORS, QUESTION_TYPES, SHAPES, answer_counts, synthesize
from data_tools.validate import validate_samples


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    path = synthesize(root, num_images=60, image_size=64, seed=3)
    return root, json.load(open(path))


def test_same_seed_is_byte_identical(shapes, tmp_path):
    root, _ = shapes
    again = synthesize(str(tmp_path / "again"), num_images=60, image_size=64, seed=3)
    assert again == os.path.join(str(tmp_path / "again"), "dataset.json")
    assert _files(root) == _files(tmp_path / "again")
    other = synthesize(str(tmp_path / "other"), num_images=60, image_size=64, seed=4)
    assert open(other, "rb").read() != open(os.path.join(root, "dataset.json"), "rb").read()


def test_answers_are_balanced_per_question_type(shapes):
    _, records = shapes
    counts = answer_counts(records)
    assert counts["count"] == {"1": 20, "2": 20, "3": 20}
    assert counts["color"] == {c: 15 for c in COLORS}
    assert counts["shape"] == {s: 20 for s in SHAPES}
    assert counts["presence"] == {"no": 30, "yes": 30}
    assert counts["position"] == {"left": 30, "right": 30}


@pytest.mark.parametrize("num_images", [7, 50])
def test_balance_when_the_count_does_not_divide(tmp_path, num_images):
    records = json.load(open(synthesize(str(tmp_path), num_images=num_images, image_size=48, seed=0)))
    for qtype, answers in answer_counts(records).items():
        expected = {"count": 3, "color": 4, "shape": 3, "presence": 2, "position": 2}[qtype]
        assert len(answers) == min(expected, num_images) and max(answers.values()) - min(answers.values()) <= 1


def _components(mask):
    """The 8-connected components of a boolean mask, each as a mask."""
    seen = np.zeros_like(mask)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        component, stack = np.zeros_like(mask), [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = component[y, x] = True
                stack += [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        yield component


def scene_from_pixels(path):
    """(colour, shape, centre x, top y) per object from the pixels; every non-white pixel accounted for."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    covered = np.zeros(pixels.shape[:2], dtype=bool)
    objects = []
    for name, rgb in COLORS.items():
        colour_mask = np.all(pixels == rgb, axis=-1)
        covered |= colour_mask
        for mask in _components(colour_mask):
            ys, xs = np.nonzero(mask)
            height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            fill = mask.sum() / (height * width)
            shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
            objects.append((name, shape, (xs.min() + xs.max()) / 2, ys.min()))
    assert (covered == np.any(pixels != 255, axis=-1)).all(), f"{path}: pixels of no known colour"
    return objects


@pytest.mark.parametrize("size, layout, kinds", [(64, "random", "distinct"), (32, "random", "distinct"),
                                                 (48, "grid", "distinct"), (32, "grid", "alike")])
def test_answers_match_the_drawn_image(shapes, tmp_path, size, layout, kinds):
    if size == 64:
        root, records = shapes
    else:
        types = [t for t in QUESTION_TYPES if not (kinds == "alike" and t == "position")]
        root = str(tmp_path)
        records = json.load(open(synthesize(root, 30, size, 1, layout=layout, question_types=types, objects=kinds)))
    for record in records:
        image = Image.open(os.path.join(root, record["image"]))
        assert image.size == (size, size)
        objects = scene_from_pixels(os.path.join(root, record["image"]))
        question = record["conversations"][0]["value"].split("\n", 1)[1]
        answer = record["conversations"][1]["value"]
        kind = record["question_type"]
        if kinds == "alike":
            assert len({(c, s) for c, s, *_ in objects}) == 1
        if kind == "count":
            assert answer == str(len(objects))
        elif kind == "color" and kinds == "alike":
            assert question == "What color are the objects?" and {c for c, *_ in objects} == {answer}
        elif kind == "shape" and kinds == "alike":
            assert question == "What shape are the objects?" and {s for _, s, *_ in objects} == {answer}
        elif kind == "color":
            shape = question.removeprefix("What color is the ").removesuffix("?")
            assert [c for c, s, *_ in objects if s == shape] == [answer]
        elif kind == "shape":
            colour = question.removeprefix("What shape is the ").removesuffix(" object?")
            assert [s for c, s, *_ in objects if c == colour] == [answer]
        elif kind == "presence":
            colour, shape = question.removeprefix("Is there a ").removesuffix("?").split()
            assert answer == ("yes" if (colour, shape) in {(c, s) for c, s, *_ in objects} else "no")
        elif kind == "position":
            colour, shape = question.removeprefix("Is the ").split(" on the")[0].split()
            [x] = [x for c, s, x, _ in objects if (c, s) == (colour, shape)]
            assert answer == ("left" if x < size / 2 else "right")
            assert abs(x - size / 2) >= 0.1 * size - 1  # clearly on one side
        elif kinds == "alike" and len(objects) > 1:
            c, s, *_ = objects[0]
            assert answer == f"{['two', 'three'][len(objects) - 2]} {c} {s}s."
        else:
            ordered = [f"a {c} {s}" for c, s, *_ in sorted(objects, key=lambda o: (o[2], o[3]))]
            assert answer.removesuffix(".").replace(" and ", ", ").split(", ") == ordered
        if layout == "grid":  # one object per cell of a 2x2 grid
            cell = size // 2
            assert len({(int(x // cell), int(y // cell)) for _, _, x, y in objects}) == len(objects)
    if layout == "grid":  # shifted inside their cells: images differ even when the scenes agree
        pictures = {open(os.path.join(root, r["image"]), "rb").read() for r in records}
        assert len(pictures) == len({r["image"] for r in records})


def test_record_fields_and_validity(shapes):
    root, records = shapes
    assert {r["question_type"] for r in records} == set(QUESTION_TYPES)
    assert len({r["id"] for r in records}) == len(records) == 60 * 6
    for record in records:
        answer = record["conversations"][1]["value"]
        assert record["references"] == [answer]
        assert record["answer_type"] == ("closed" if answer in ("yes", "no") else "open")
        assert record["conversations"][0]["value"].startswith("<image>\n")
    # Hard negatives: with two objects or more, a "no" presence question names a colour and a shape
    # that are both in the image (on different objects), so colour and shape must be bound.
    by_image = {}
    for record in records:
        by_image.setdefault(record["image"], {})[record["question_type"]] = record
    for image, qs in by_image.items():
        presence = qs["presence"]
        if presence["conversations"][1]["value"] == "no" and qs["count"]["conversations"][1]["value"] != "1":
            colour, shape = presence["conversations"][0]["value"].split("Is there a ")[1].rstrip("?").split()
            caption = qs["caption"]["conversations"][1]["value"]
            assert colour in caption and shape in caption
    assert validate_samples(records, root).errors == []


def test_cli_writes_summary_and_refuses_to_overwrite(tmp_path, capsys):
    out, report = tmp_path / "set", tmp_path / "report.json"
    assert synth.main(["--out-dir", str(out), "--num-images", "12", "--image-size", "40",
                       "--report", str(report)]) == 0
    assert "wrote 72 records for 12 images" in capsys.readouterr().out
    assert json.load(open(report))["answer_counts"]["count"] == {"1": 4, "2": 4, "3": 4}
    assert synth.main(["--out-dir", str(out), "--num-images", "12"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert synth.main(["--out-dir", str(out), "--num-images", "12", "--image-size", "8", "--overwrite"]) == 2
    assert "--image-size must be at least" in capsys.readouterr().err


def test_question_types_pick_records_and_keep_the_images(shapes, tmp_path):
    root, records = shapes
    path = synthesize(str(tmp_path), num_images=60, image_size=64, seed=3, question_types=["count", "caption"])
    subset = json.load(open(path))
    assert subset == [r for r in records if r["question_type"] in ("count", "caption")]
    assert _files(tmp_path / "images") == _files(os.path.join(root, "images"))
    with pytest.raises(synth.DataToolError, match="question types"):
        synthesize(str(tmp_path), 2, 64, 0, question_types=["colour"])


def test_alike_objects_refuse_position_and_ask_presence_about_any_other_pair(tmp_path):
    with pytest.raises(synth.DataToolError, match="position questions need distinct objects"):
        synthesize(str(tmp_path / "a"), 6, 32, 0, layout="grid", objects="alike")
    records = json.load(open(synthesize(str(tmp_path / "b"), 200, 32, 0, layout="grid", objects="alike",
                                        question_types=["caption", "presence"])))
    captions = {r["image"]: r["conversations"][1]["value"] for r in records if r["question_type"] == "caption"}
    shared = collections.Counter()
    for record in records:
        if record["question_type"] == "presence" and record["conversations"][1]["value"] == "no":
            colour, shape = record["conversations"][0]["value"].removeprefix("<image>\nIs there a ").rstrip("?").split()
            caption = captions[record["image"]]
            assert not (colour in caption and shape in caption)
            shared[(colour in caption) + (shape in caption)] += 1
    # "no" questions sometimes share the colour or the shape of the picture: one attribute is not enough
    assert shared[0] > 0 and shared[1] > 0
    # every picture is asked once with "yes" and once with "no"
    answers = collections.defaultdict(list)
    for record in records:
        if record["question_type"] == "presence":
            answers[record["image"]].append(record["conversations"][1]["value"])
    assert len(answers) == 200 and all(sorted(a) == ["no", "yes"] for a in answers.values())
    assert all(r["scene"] == captions[r["image"]].removesuffix(".") for r in records)
