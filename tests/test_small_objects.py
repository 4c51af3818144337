"""The small-objects variant of data_tools.synthesize: one small shape per image, answers balanced and true to
the pixels, the question's words uninformative, byte-identical files; reachable from the CLI and the demo."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_tools import synthesize
from data_tools.io import DataToolError
from data_tools.small_objects import synthesize_small_objects
from data_tools.synthesize import COLORS, SHAPES
from data_tools.validate import validate_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("small"))
    path = synthesize_small_objects(root, num_images=48, image_size=64, seed=5)
    return root, json.load(open(path))


def _answer(record):
    return record["conversations"][-1]["value"]


def test_records_per_image_and_balanced_answers(small):
    _, records = small
    by_type = collections.defaultdict(collections.Counter)
    for record in records:
        by_type[record["question_type"]][_answer(record)] += 1
    assert set(by_type) == {"color", "shape", "presence", "position"}
    assert by_type["color"] == {c: 12 for c in COLORS}
    assert by_type["shape"] == {s: 16 for s in SHAPES}
    assert by_type["presence"] == {"yes": 48, "no": 48}
    assert by_type["position"] == {"left": 24, "right": 24}
    assert len({r["id"] for r in records}) == len(records) == 48 * 5
    assert all(r["id"].startswith("small-") and r["source"] == "synthetic-small-objects" for r in records)


def test_answers_match_the_pixels(small):
    root, records = small
    by_image = collections.defaultdict(dict)
    for record in records:
        by_image[record["image"]].setdefault(record["question_type"], []).append(record)
    for image, asked in by_image.items():
        pixels = np.asarray(Image.open(os.path.join(root, image)).convert("RGB")).astype(int)
        mask = (pixels != 255).any(axis=-1)
        ys, xs = np.nonzero(mask)
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert side <= 12, image  # small: under one 16-px patch of a 64-px image
        color = _answer(asked["color"][0])
        assert (pixels[mask] == COLORS[color]).all(), image
        fill = mask.sum() / side ** 2  # square 1, circle ~0.79, triangle ~0.5
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        assert _answer(asked["shape"][0]) == shape, image
        assert _answer(asked["position"][0]) == ("left" if xs.mean() < 32 else "right"), image
        yes, no = sorted(asked["presence"], key=_answer, reverse=True)
        assert (_answer(yes), _answer(no)) == ("yes", "no")
        assert yes["conversations"][0]["value"].endswith(f"{color} {shape}?")
        assert not no["conversations"][0]["value"].endswith(f"{color} {shape}?")


def test_the_words_tell_nothing_and_the_set_validates(small):
    root, records = small
    questions = collections.Counter(r["conversations"][0]["value"] for r in records if r["question_type"] == "shape")
    assert len(questions) == 1  # the shape question never names the shape
    assert not validate_samples(records, image_folder=root).errors


def test_same_seed_same_bytes_and_bad_arguments(small, tmp_path):
    root, _ = small
    again = synthesize_small_objects(str(tmp_path / "again"), num_images=48, image_size=64, seed=5)
    assert open(again, "rb").read() == open(os.path.join(root, "dataset.json"), "rb").read()
    assert open(tmp_path / "again" / "images" / "00007.png", "rb").read() == \
        open(os.path.join(root, "images", "00007.png"), "rb").read()
    with pytest.raises(DataToolError, match="no count questions"):
        synthesize_small_objects(str(tmp_path / "x"), 4, 64, 0, ["count"])
    with pytest.raises(DataToolError, match="at least 32"):
        synthesize_small_objects(str(tmp_path / "x"), 4, 16, 0)


def test_cli_variant(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert synthesize.main(["--variant", "small-objects", "--out-dir", out, "--num-images", "6",
                            "--question-types", "shape", "caption"]) == 0
    records = json.load(open(os.path.join(out, "dataset.json")))
    assert {r["question_type"] for r in records} == {"shape", "caption"}
    assert "one small object" in capsys.readouterr().out
