"""partition --keep-split (data_tools/kept_split.py): a dataset's own split kept, a val part drawn from train only,
leakage across the kept parts reported, clear errors naming the samples; and demo.sh passes the flags on."""
import json
import os
import subprocess

import pytest

from data_tools import partition
from data_tools.io import DataToolError
from data_tools.kept_split import parse_split_values, split_names
from data_tools.testing import conversation, distinct_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, splits, label_of=lambda i: f"c{i % 2}"):
    folder = tmp_path / "images"
    folder.mkdir()
    samples = []
    for i, split in enumerate(splits):
        distinct_image(i).save(folder / f"{i}.png")
        samples.append({"id": f"s{i}", "image": f"{i}.png", "label": label_of(i), "split": split,
                        "conversations": conversation("What is it?", label_of(i))})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return str(path), str(folder), samples


def _sets(out):
    return {name: [s["id"] for s in json.load(open(os.path.join(out, f"data_{name}.json")))]
            for name in ("train", "val", "test") if os.path.exists(os.path.join(out, f"data_{name}.json"))}


def test_the_records_own_split_is_kept_and_val_is_drawn_from_train_only(tmp_path):
    splits = ["train"] * 40 + ["test"] * 10
    data, images, _ = _write(tmp_path, splits)
    out = str(tmp_path / "sets")
    assert partition.main(["--data", data, "--image-folder", images, "--out-dir", out, "--keep-split",
                           "--stratify", "label"]) == 0
    sets = _sets(out)
    assert sets["test"] == [f"s{i}" for i in range(40, 50)]  # untouched, in input order
    assert sorted(sets["train"] + sets["val"], key=lambda s: int(s[1:])) == [f"s{i}" for i in range(40)]
    assert len(sets["val"]) in (5, 6)  # 0.1 / (0.7 + 0.1) of the 40 train samples, per label up to one group
    val = json.load(open(os.path.join(out, "data_val.json")))
    assert sorted(s["label"] for s in val).count("c0") in (2, 3)  # stratified
    report = json.load(open(os.path.join(out, "leakage_report.json")))
    assert report["kept_split"] == "split" and report["shared_images"] == 0


def test_usual_names_any_case_and_mapped_values(tmp_path):
    samples = [{"id": f"s{i}", "split": v} for i, v in enumerate(["Train", "validation", "TEST", "dev", "holdout"])]
    names = split_names(samples, "split", parse_split_values(["test=holdout"]), "d.json")
    assert names == ["train", "val", "test", "val", "test"]


@pytest.mark.parametrize("splits, message", [
    (["train", None, "test"], "1 sample(s) have no 'split' field, e.g. sample 's1'"),
    (["train", "extra", "test", "extra"], "'extra' (2 samples, e.g. 's1')"),
    (["train", "train"], "expected a train and a test part"),
])
def test_errors_name_the_samples(splits, message):
    samples = [{"id": f"s{i}", **({"split": v} if v else {})} for i, v in enumerate(splits)]
    with pytest.raises(DataToolError, match="d.json") as error:
        split_names(samples, "split", {}, "d.json")
    assert message in str(error.value)
    with pytest.raises(DataToolError, match="NAME=VALUE"):
        parse_split_values(["holdout"])


def test_an_image_in_two_kept_parts_is_reported(tmp_path):
    data, images, samples = _write(tmp_path, ["train"] * 8 + ["test"] * 4)
    samples[9]["image"] = samples[0]["image"]  # the official test part reuses a training picture
    open(data, "w").write(json.dumps(samples))
    out = str(tmp_path / "sets")
    assert partition.main(["--data", data, "--image-folder", images, "--out-dir", out, "--keep-split", "split"]) == 1
    assert "s9" in _sets(out)["test"] and "s0" in _sets(out)["train"] + _sets(out)["val"]
    assert json.load(open(os.path.join(out, "leakage_report.json")))["shared_images"] >= 1


def test_split_value_needs_keep_split(tmp_path):
    data, images, _ = _write(tmp_path, ["train", "test"])
    assert partition.main(["--data", data, "--out-dir", str(tmp_path / "o"), "--split-value", "test=x"]) != 0


def test_demo_refuses_keep_split_without_data_before_anything_runs(tmp_path):
    (tmp_path / "d.json").write_text("[]")
    for args, said in [(["--keep-split"], "--keep-split keeps the split of your --data"),
                       (["--data", str(tmp_path / "d.json"), "--split-value", "test=v"], "--split-value names values"),
                       (["--max-new-tokens", "0"], "expected a whole number"),
                       (["--task", "nope"], "expected shapes or small-objects")]:
        run = subprocess.run(["bash", "scripts/demo.sh", "--out", str(tmp_path / "o"), *args], cwd=ROOT,
                             capture_output=True, text=True)
        assert run.returncode == 2 and said in run.stderr, (args, run.stderr)
        assert not (tmp_path / "o").exists()
