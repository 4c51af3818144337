"""data_tools.synthesize --question-types same-color: "Do the two images show the same colour?" about two images
(two `<image>` markers, a list of two paths), answers balanced and read back from the pixels, for the alike scenes and
the highres variant; adding the question leaves the other records as they were."""
import collections
import json

import numpy as np
import pytest
from PIL import Image

from data_tools.highres import synthesize_highres
from data_tools.io import DataToolError
from data_tools.pairs import SAME_COLOR_QUESTION
from data_tools.shapes import BACKGROUND, COLORS
from data_tools.synthesize import main, synthesize
from data_tools.validate import validate_samples


def _colours(path):
    """The object colour names of an image (every pixel that is not background has an exact colour)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    found = {tuple(p) for p in np.unique(pixels, axis=0)} - {tuple(BACKGROUND)}
    by_value = {tuple(value): name for name, value in COLORS.items()}
    return {by_value[value] for value in found}


@pytest.mark.parametrize("variant", ["alike", "highres"])
def test_two_image_answers_are_balanced_and_match_the_pixels(tmp_path, variant):
    root = tmp_path / variant
    if variant == "alike":
        path = synthesize(str(root), num_images=24, image_size=48, seed=1, objects="alike",
                          question_types=["color", "same-color"])
    else:
        path = synthesize_highres(str(root), num_images=24, image_size=64, seed=1,
                                  question_types=["color", "same-color"])
    records = json.load(open(path))
    pairs = [r for r in records if r["question_type"] == "same-color"]
    assert len(pairs) == 24 and collections.Counter(r["references"][0] for r in pairs) == {"yes": 12, "no": 12}
    firsts = collections.Counter()
    for record in pairs:
        assert record["conversations"][0]["value"] == "<image>\n<image>\n" + SAME_COLOR_QUESTION
        assert len(record["image"]) == 2 and record["image"][0] != record["image"][1]
        first, second = (_colours(root / image) for image in record["image"])
        assert len(first) == len(second) == 1, record["id"]
        assert record["conversations"][1]["value"] == ("yes" if first == second else "no"), record["id"]
        firsts[record["id"].split("-")[1] in record["image"][0]] += 1
    assert 6 <= firsts[True] <= 18  # the asked-about image comes first about half the time
    assert not validate_samples(records, image_folder=str(root)).errors
    # the other records are those of the same call without the two-image question
    plain = (synthesize(str(tmp_path / "plain"), num_images=24, image_size=48, seed=1, objects="alike",
                        question_types=["color"]) if variant == "alike" else
             synthesize_highres(str(tmp_path / "plain"), num_images=24, image_size=64, seed=1, question_types=["color"]))
    assert json.load(open(plain)) == [r for r in records if r["question_type"] != "same-color"]


def test_same_color_needs_one_colour_per_image(tmp_path, capsys):
    with pytest.raises(DataToolError, match="--objects alike"):
        synthesize(str(tmp_path / "a"), num_images=8, image_size=48, question_types=["same-color"])
    assert main(["--out-dir", str(tmp_path / "b"), "--num-images", "1", "--image-size", "48", "--objects", "alike",
                 "--question-types", "same-color"]) != 0
    assert "more --num-images" in capsys.readouterr().err
