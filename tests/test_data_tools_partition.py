"""data_tools.partition / check_leakage: no picture in two splits, deterministic files, ratios, grouping."""
import json
import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_tools import check_leakage, partition
from data_tools.grouping import group_samples_by_image, image_keys, index_images
from data_tools.partition import assign_groups, group_split_by_image, parse_ratios
from data_tools.testing import conversation, distinct_image


def _sample(sid, image=None, question="What is shown?"):
    return {"id": sid, **({"image": image} if image else {}),
            "conversations": conversation(question, f"answer {sid}", image=image is not None)}


@pytest.fixture
def dataset(tmp_path):
    """60 images; `a.png` also as `copies/a_same.png` (same bytes) and `d.png` as `other/d_q90.jpg`."""
    folder = tmp_path / "images"
    (folder / "copies").mkdir(parents=True)
    (folder / "other").mkdir()
    samples = []
    for i in range(60):
        name = {0: "a.png", 3: "d.png"}.get(i, f"img_{i}.png")
        distinct_image(100 + i, 64).save(folder / name)
        for q in range(1 + i % 3):  # 1-3 questions per image
            samples.append(_sample(f"{name}-{q}", name, f"Question {q}?"))
    shutil.copy(folder / "a.png", folder / "copies" / "a_same.png")
    Image.open(folder / "d.png").convert("RGB").save(folder / "other" / "d_q90.jpg", quality=90)
    samples += [_sample("a-copy-0", "copies/a_same.png"), _sample("a-copy-1", "copies/./a_same.png"),
                _sample("d-jpeg", "other/d_q90.jpg")]
    samples += [_sample(f"text-{i}") for i in range(5)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    return {"data": str(data), "image_folder": str(folder), "samples": samples}


def _split_of_images(out_dir):
    where = {}
    for name in ("train", "val", "test"):
        path = os.path.join(out_dir, f"data_{name}.json")
        if os.path.exists(path):
            for sample in json.load(open(path)):
                if "image" in sample:
                    where.setdefault(os.path.normpath(sample["image"]), set()).add(name)
    return where


def test_no_picture_in_two_splits(dataset, tmp_path, capsys):
    out = tmp_path / "sets"
    assert partition.main(["--data", dataset["data"], "--image-folder", dataset["image_folder"],
                           "--out-dir", str(out), "--seed", "3"]) == 0
    where = _split_of_images(out)
    assert all(len(splits) == 1 for splits in where.values())  # same file: one split
    assert where["a.png"] == where["copies/a_same.png"]  # same bytes, other name
    assert where["d.png"] == where["other/d_q90.jpg"]  # re-encoded as JPEG quality 90
    total = sum(len(json.load(open(out / f"data_{n}.json"))) for n in ("train", "val", "test"))
    assert total == len(dataset["samples"])
    report = json.load(open(out / "leakage_report.json"))
    assert report["shared_images"] == 0 and report["content_checked"]
    assert "leakage across the written splits" in capsys.readouterr().out
    # The audit tool agrees.
    files = [str(out / f"data_{n}.json") for n in ("train", "val", "test")]
    assert check_leakage.main([*files, "--image-folder", dataset["image_folder"]]) == 0


def test_content_grouping_needs_both_checks(dataset):
    samples = dataset["samples"]
    keys = image_keys(samples)
    ids = [s["id"] for s in samples]

    def together(groups, a, b):
        return any(ids.index(a) in g and ids.index(b) in g for g in groups)

    by_path = group_samples_by_image(keys)
    assert together(by_path, "a.png-0", "a.png-0") and not together(by_path, "a.png-0", "a-copy-0")
    assert together(by_path, "a-copy-0", "a-copy-1")  # `copies/./a_same.png` is the same path
    full = group_samples_by_image(keys, index_images(keys, dataset["image_folder"]))
    assert together(full, "a.png-0", "a-copy-1") and together(full, "d.png-0", "d-jpeg")
    exact_only = group_samples_by_image(keys, index_images(keys, dataset["image_folder"], phash_threshold=-1))
    assert together(exact_only, "a.png-0", "a-copy-0") and not together(exact_only, "d.png-0", "d-jpeg")
    # Distinct pictures stay apart: only the two planted duplicates merge image groups.
    assert len(by_path) - len(full) == 2


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    outputs = []
    for run, seed in enumerate([7, 7, 8]):
        out = tmp_path / f"run{run}"
        assert partition.main(["--data", dataset["data"], "--image-folder", dataset["image_folder"],
                               "--out-dir", str(out), "--seed", str(seed)]) == 0
        outputs.append({name: (out / name).read_bytes() for name in sorted(os.listdir(out))})
    assert sorted(outputs[0]) == ["data_test.json", "data_train.json", "data_val.json", "leakage_report.json"]
    assert outputs[0] == outputs[1]
    assert outputs[0]["data_train.json"] != outputs[2]["data_train.json"]


@pytest.mark.parametrize("ratios", [(0.7, 0.1, 0.2), (0.5, 0.25, 0.25), (0.8, 0.2)])
def test_ratios_hold_within_one_group(dataset, ratios):
    samples = dataset["samples"]
    result = group_split_by_image(samples, ratios, seed=1, image_folder=dataset["image_folder"])
    largest = max(len(g) for g in result.groups)
    assert largest == 3  # images with 3 questions, and a.png (1) joined with its byte-identical copy (2)
    named = parse_ratios(ratios)
    for name, split in result.splits.items():
        assert abs(len(split) - named[name] * len(samples)) <= largest, (name, len(split))
    assert sum(len(s) for s in result.splits.values()) == len(samples)


def test_stratified_ratios_hold_within_each_source(dataset):
    # Three sources of different sizes; every image (group) belongs to one source.
    samples = [dict(s, source=f"src{len(s.get('image', '')) % 3}") for s in dataset["samples"]]
    result = group_split_by_image(samples, (0.6, 0.2, 0.2), seed=5, stratify="source")
    named = parse_ratios((0.6, 0.2, 0.2))
    for source in {s["source"] for s in samples}:
        total = sum(1 for s in samples if s["source"] == source)
        largest = max(len(g) for g in result.groups if samples[g[0]]["source"] == source)
        for name, split in result.splits.items():
            count = sum(1 for s in split if s["source"] == source)
            assert abs(count - named[name] * total) <= largest, (source, name, count, total)


def test_two_ratios_mean_train_and_test(dataset, tmp_path):
    out = tmp_path / "sets"
    assert partition.main(["--data", dataset["data"], "--out-dir", str(out), "--ratios", "0.8", "0.2"]) == 0
    assert sorted(os.listdir(out)) == ["data_test.json", "data_train.json", "leakage_report.json"]
    assert parse_ratios(["0.7", "0.2"]) == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2})
    for bad in (["0.7", "0.2", "0.2"], ["0.9", "0.2"], ["1"], ["-0.1", "1.1"]):
        with pytest.raises(partition.DataToolError, match="--ratios"):
            parse_ratios(bad)


def test_refuses_to_write_over_its_input(dataset, tmp_path, capsys):
    out = tmp_path / "sets"
    out.mkdir()
    data = out / "data_train.json"
    shutil.copy(dataset["data"], data)
    before = data.read_bytes()
    assert partition.main(["--data", str(data), "--out-dir", str(out)]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_check_leakage_finds_each_kind(dataset, tmp_path, capsys):
    by_id = {s["id"]: s for s in dataset["samples"]}

    def split(name, ids):
        path = tmp_path / name
        path.write_text(json.dumps([by_id[i] for i in ids]))
        return str(path)

    train = split("train.json", ["a.png-0", "d.png-0", "img_1.png-0", "img_2.png-0"])
    test = split("test.json", ["a-copy-0", "d-jpeg", "img_1.png-1", "img_4.png-0"])
    report = tmp_path / "report.json"
    assert check_leakage.main([train, test, "--image-folder", dataset["image_folder"], "--report", str(report)]) == 1
    data = json.load(open(report))
    assert (data["shared_image_files"], data["exact_duplicates_across_splits"],
            data["near_duplicates_across_splits"], data["shared_images"]) == (1, 1, 1, 3)
    assert data["examples"]["near_duplicates"][0]["samples"] == ["d.png-0", "d-jpeg"]
    out = capsys.readouterr().out
    assert "LEAKS FOUND" in out and "img_1.png" in out
    # Without the image folder only the shared file is seen, and the output says so.
    assert check_leakage.main([train, test]) == 1
    assert "file paths only" in capsys.readouterr().out
    clean = split("clean.json", ["img_4.png-0"])
    assert check_leakage.main([train, clean, "--image-folder", dataset["image_folder"]]) == 0


def test_near_duplicate_of_a_renamed_copy_is_a_leak(dataset, tmp_path):
    """The near-duplicate check covers every name of a picture, not only the one it was hashed under."""
    folder = dataset["image_folder"]
    Image.open(os.path.join(folder, "a.png")).convert("RGB").save(os.path.join(folder, "other", "a_q90.jpg"),
                                                                   quality=90)
    test = tmp_path / "test.json"
    test.write_text(json.dumps([_sample("a", "a.png"), _sample("a-jpeg", "other/a_q90.jpg")]))
    train = tmp_path / "train.json"
    train.write_text(json.dumps([_sample("a-copy", "copies/a_same.png")]))
    report = check_leakage.find_leakage([str(test), str(train)], folder)
    assert report["exact_duplicates_across_splits"] == 1  # a.png (test) and a_same.png (train)
    near = report["examples"]["near_duplicates"]
    # a_q90.jpg (test) was compared with a.png (test) only, but a.png's bytes are also in train.
    assert [(sorted(e["splits"]), sorted(e["samples"])) for e in near] == [(["test.json", "train.json"],
                                                                            ["a-copy", "a-jpeg"])]


# Random group structures: samples use 0-3 images from a small pool, so images chain samples together.
structures = st.lists(st.lists(st.integers(0, 14), max_size=3), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(structures, st.integers(0, 2**16), st.sampled_from([(0.7, 0.1, 0.2), (0.5, 0.5), (0.34, 0.33, 0.33)]))
def test_grouping_is_never_violated(images_per_sample, seed, ratios):
    samples = [_sample(f"s{i}", [f"pool/{k}.png" for k in images] or None)
               for i, images in enumerate(images_per_sample)]
    result = group_split_by_image(samples, ratios, seed=seed)
    split_of = {s["id"]: name for name, split in result.splits.items() for s in split}
    assert len(split_of) == len(samples)
    for image in range(15):
        users = {split_of[f"s{i}"] for i, images in enumerate(images_per_sample) if image in images}
        assert len(users) <= 1, (image, users)
    largest = max(len(g) for g in result.groups)
    for name, split in result.splits.items():
        assert abs(len(split) - parse_ratios(ratios)[name] * len(samples)) <= largest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.sampled_from("abc")), min_size=1, max_size=80),
       st.integers(0, 1000))
def test_assignment_bound_per_stratum(groups, seed):
    sizes, strata = [g[0] for g in groups], [g[1] for g in groups]
    ratios = [0.6, 0.15, 0.25]
    assignment = assign_groups(sizes, ratios, seed, strata)
    for stratum in set(strata):
        members = [i for i, s in enumerate(strata) if s == stratum]
        total = sum(sizes[i] for i in members)
        largest = max(sizes[i] for i in members)
        for k, ratio in enumerate(ratios):
            filled = sum(sizes[i] for i in members if assignment[i] == k)
            assert abs(filled - ratio * total) <= largest


def test_stratify_by_any_field_from_the_command_line(dataset, tmp_path):
    samples = [dict(s, scene=f"scene{len(s.get('image', '')) % 2}") for s in dataset["samples"]]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    out = tmp_path / "sets"
    assert partition.main(["--data", str(data), "--out-dir", str(out), "--ratios", "0.5", "0.5",
                           "--stratify", "scene", "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["per_scene"]) == {"scene0", "scene1"}
