"""scripts/demo.sh --data: the demo's chain on a user's converted image-folder dataset, to the report."""
import json
import os
import random
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}


def write_image_folder(root, per_class=6, size=32, seed=0):
    """ROOT/<colour>/<n>.png: a disc of the class colour on random speckles; every third image is RGBA with
    random colours under its transparent pixels (a stamp), as the issue's real data had."""
    rng = random.Random(seed)
    for name, rgb in COLOURS.items():
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            stamp = i % 3 == 0
            alpha = (0,) if stamp else ()
            image = Image.new("RGBA" if stamp else "RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))
                              + alpha)
            draw = ImageDraw.Draw(image)
            for _ in range(6):  # speckles: no two pictures are near duplicates, so partition can spread them
                x, y = rng.randrange(size), rng.randrange(size)
                draw.rectangle([x, y, x + 3, y + 3], fill=tuple(rng.randrange(256) for _ in range(3)) + alpha)
            x, y, r = rng.randrange(6, 14), rng.randrange(6, 14), rng.randrange(8, 12)
            draw.ellipse([x, y, x + 2 * r, y + 2 * r], fill=rgb + ((255,) if stamp else ()))
            image.save(os.path.join(root, name, f"{name}_{i}.png"))


def _demo(*args, env=None, timeout=900):
    return subprocess.run(["bash", "scripts/demo.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_demo_runs_on_a_converted_image_folder_to_the_report(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "run"
    write_image_folder(str(photos))
    subprocess.run([sys.executable, "-m", "data_tools.convert", "imagefolder", "--input", str(photos),
                    "--out", str(photos / "dataset.json")], cwd=ROOT, check=True, capture_output=True)
    done = _demo("--data", str(photos), "--out", str(out), "--steps", "4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "from-scratch variant" in done.stdout and "majority class" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith(f"report: {out}/report.md")
    # validate saw the stamps; partition kept every class in train and test (stratified by label)
    validated = json.loads((out / "validate_report.json").read_text())
    assert validated["warnings_by_kind"] == {"transparent_image": 6} and validated["image_modes"] == {"RGB": 12, "RGBA": 6}
    for split in ("train", "test"):
        labels = {r["label"] for r in json.loads((out / "data" / "sets" / f"data_{split}.json").read_text())}
        assert labels == set(COLOURS), split
    # the tiny tokenizer learnt the data's own words: a class name is one token, not letters
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out / "base" / "llm"))
    assert all(len(tokenizer(name, add_special_tokens=False)["input_ids"]) == 1 for name in COLOURS)
    # the report: model vs blind vs majority class (from the training split), per-answer table, confusion matrix
    metrics = json.loads((out / "metrics.json").read_text())
    looking = metrics["looking"]
    assert looking["majority_from"] == "training data" and set(looking["by_answer"]) == set(COLOURS)
    assert looking["overall"]["n"] == metrics["counts"]["vqa"] == len(
        json.loads((out / "data" / "sets" / "data_test.json").read_text()))
    assert set(metrics["confusion_matrix"]["labels"]) == set(COLOURS)
    for name in ("report.md", "model_blind_majority.png", "confusion_matrix.png", "loss_curve.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "## Is the model looking at the image?" in report and "No accuracy_by_question_type.png" in report
    preds = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    assert {p["label"] for p in preds} == set(COLOURS)  # the record's own fields reach the predictions


def test_demo_data_arguments_are_checked_before_anything_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [(["--data", str(tmp_path / "nothing")], "no such file or folder"),
             (["--data", str(tmp_path / "empty")], "no dataset.json or dataset.jsonl in it"),
             (["--data", str(tmp_path / "empty"), "--images", "10"], "cannot be combined with --data"),
             (["--image-folder", str(tmp_path)], "--image-folder goes with --data"),
             (["--image-size", "40"], "--image-size 40: expected a multiple")]
    for args, message in cases:
        done = _demo(*args, "--out", str(tmp_path / "out"), timeout=60)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    assert not (tmp_path / "out").exists()
