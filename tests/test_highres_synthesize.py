"""The highres variant of data_tools.synthesize: 1-3 tiny alike shapes in a large image, answers balanced and
true to the pixels, the question's words uninformative, byte-identical files; reachable from the CLI."""
import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_tools import synthesize
from data_tools.highres import synthesize_highres
from data_tools.io import DataToolError
from data_tools.synthesize import COLORS, SHAPES
from data_tools.validate import validate_samples

from test_data_tools_synthesize import _components


@pytest.fixture(scope="module", params=[128, 256])
def highres(tmp_path_factory, request):
    root = str(tmp_path_factory.mktemp(f"highres{request.param}"))
    path = synthesize_highres(root, num_images=24, image_size=request.param, seed=5)
    return root, request.param, json.load(open(path))


def _answer(record):
    return record["conversations"][-1]["value"]


def test_records_per_image_and_balanced_answers(highres):
    _, _, records = highres
    by_type = collections.defaultdict(collections.Counter)
    for record in records:
        by_type[record["question_type"]][_answer(record)] += 1
    assert set(by_type) == {"color", "shape", "count", "presence"}
    assert by_type["color"] == {c: 6 for c in COLORS}
    assert by_type["shape"] == {s: 8 for s in SHAPES}
    assert by_type["count"] == {"1": 8, "2": 8, "3": 8}
    assert by_type["presence"] == {"yes": 24, "no": 24}
    assert len({r["id"] for r in records}) == len(records) == 24 * 5
    assert all(r["id"].startswith("highres-") and r["source"] == "synthetic-highres" for r in records)


def test_answers_match_the_pixels(highres):
    """Peer: colour, shape and count read back from the pixels (8-connected blobs, their fill of the box)."""
    root, size, records = highres
    by_image = collections.defaultdict(dict)
    for record in records:
        by_image[record["image"]].setdefault(record["question_type"], []).append(record)
    for image, asked in by_image.items():
        pixels = np.asarray(Image.open(os.path.join(root, image)).convert("RGB")).astype(int)
        assert pixels.shape == (size, size, 3)
        blobs = list(_components((pixels != 255).any(axis=-1)))
        assert len(blobs) == int(_answer(asked["count"][0])), image
        color, shape = _answer(asked["color"][0]), _answer(asked["shape"][0])
        for blob in blobs:
            assert (pixels[blob] == COLORS[color]).all(), image
            ys, xs = np.nonzero(blob)
            side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            assert side == size // 16, image  # a few pixels: 8 at 128 px, 16 at 256 px
            fill = blob.sum() / side ** 2  # square 1, circle ~0.8, triangle ~0.55
            assert shape == ("square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"), image
        yes, no = sorted(asked["presence"], key=_answer, reverse=True)
        assert (_answer(yes), _answer(no)) == ("yes", "no")
        assert yes["conversations"][0]["value"].endswith(f"{color} {shape}?")
        assert not no["conversations"][0]["value"].endswith(f"{color} {shape}?")


def test_the_words_tell_nothing_and_the_set_validates(highres):
    root, _, records = highres
    for qtype in ("color", "shape", "count"):
        assert len({r["conversations"][0]["value"] for r in records if r["question_type"] == qtype}) == 1
    asked = collections.Counter((r["conversations"][0]["value"], _answer(r)) for r in records
                                if r["question_type"] == "presence")
    assert len({question for question, _ in asked}) > 6  # many pairs asked, not one per answer
    assert not validate_samples(records, image_folder=root).errors


def test_same_seed_same_bytes_and_bad_arguments(tmp_path):
    first = synthesize_highres(str(tmp_path / "a"), num_images=6, image_size=128, seed=2)
    again = synthesize_highres(str(tmp_path / "b"), num_images=6, image_size=128, seed=2)
    assert open(first, "rb").read() == open(again, "rb").read()
    assert open(tmp_path / "a" / "images" / "00005.png", "rb").read() == \
        open(tmp_path / "b" / "images" / "00005.png", "rb").read()
    with pytest.raises(DataToolError, match="no position questions"):
        synthesize_highres(str(tmp_path / "x"), 4, 128, 0, ["position"])
    with pytest.raises(DataToolError, match="at least 64"):
        synthesize_highres(str(tmp_path / "x"), 4, 32, 0)


def test_cli_variant(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert synthesize.main(["--variant", "highres", "--out-dir", out, "--num-images", "6", "--image-size", "128",
                            "--question-types", "count", "caption"]) == 0
    records = json.load(open(os.path.join(out, "dataset.json")))
    assert {r["question_type"] for r in records} == {"count", "caption"}
    captions = {r["image"]: _answer(r) for r in records if r["question_type"] == "caption"}
    counts = {r["image"]: _answer(r) for r in records if r["question_type"] == "count"}
    words = {"1": "a", "2": "two", "3": "three"}
    assert all(captions[image].startswith(words[n] + " ") for image, n in counts.items())
    assert "1-3 tiny alike objects" in capsys.readouterr().out
