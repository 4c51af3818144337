"""data_tools.validate: every error kind named with its sample id, clean output, exit codes, token lengths."""
import json
import os
import subprocess
import sys

import pytest

from data_tools.testing import conversation, distinct_image, write_rs_dataset
from data_tools.validate import main, validate_samples
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(samples, f)
    return str(path)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        distinct_image(i).save(folder / f"{i}.png")
    (tmp_path / "outside.png").write_bytes((folder / "0.png").read_bytes())
    return folder


def _good(sid, image="0.png"):
    return {"id": sid, "image": image, "conversations": conversation("What is this?", "A pattern.")}


BAD_SAMPLES = {
    "missing_id": {"image": "1.png", "conversations": conversation("Q?", "A.")},
    "bad_conversations": {"id": "s", "image": "1.png", "conversations": []},
    "bad_roles": {"id": "s", "image": "1.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                                   {"from": "human", "value": "A."}]},
    "empty_turn": {"id": "s", "image": "1.png", "conversations": conversation("Q?", "  ")},
    "image_in_answer": {"id": "s", "image": "1.png",
                        "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                          {"from": "gpt", "value": "<image>"}]},
    "bad_image_field": {"id": "s", "image": {"path": "1.png"}, "conversations": conversation("Q?", "A.")},
    "image_outside_folder": {"id": "s", "image": "../outside.png", "conversations": conversation("Q?", "A.")},
    "missing_image": {"id": "s", "image": "nope.png", "conversations": conversation("Q?", "A.")},
    "image_marker_mismatch": {"id": "s", "image": "1.png", "conversations": conversation("Q?", "A.", image=False)},
}


@pytest.mark.parametrize("kind", sorted(BAD_SAMPLES))
def test_each_error_kind_names_the_sample(image_folder, kind):
    samples = [_good("good"), BAD_SAMPLES[kind]]
    result = validate_samples(samples, str(image_folder))
    expected_id = "#1" if kind == "missing_id" else samples[1]["id"]
    assert [(e.sample_id, e.kind) for e in result.errors if e.kind == kind] == [(expected_id, kind)]
    assert result.bad_indices == {1}  # the good sample is never blamed


def test_repeated_records_are_warnings_here_and_in_training(tmp_path, tiny_parts, caplog):
    """One rule in both: a repeated id or a repeated sample is a warning of validate (exit 0) and of training's
    dataset, which keeps every record (peer: LazySupervisedDataset, what training reads)."""
    from transformers import AutoTokenizer

    from llava_tiny.train.dataset import LazySupervisedDataset

    def text(sid, question):
        return {"id": sid, "conversations": conversation(question, "A.", image=False)}

    samples = [text("a", "First?"), text("a", "Second?"), text("b", "First?")]
    data = _write(tmp_path / "data.json", samples)
    result = validate_samples(samples)
    assert result.errors == []
    assert [(w.sample_id, w.kind) for w in result.warnings] == [("a", "duplicate_id"), ("b", "duplicate_sample")]
    assert main(["--data", data]) == 0
    assert validate_samples(samples, allow_duplicates=True).warnings == []
    with caplog.at_level("WARNING", logger="llava_tiny.train.dataset"):
        dataset = LazySupervisedDataset(data, AutoTokenizer.from_pretrained(tiny_parts["llm"]), None, "llava_v1", 0)
    warned = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
    assert len(warned) == 1 and "1 duplicate_id, 1 duplicate_sample" in warned[0], warned
    assert len(dataset) == 3


def test_markers_without_image_and_absolute_paths(image_folder):
    samples = [{"id": "text", "conversations": conversation("Q?", "A.")},  # text-only: fine
               {"id": "marker-no-image", "conversations": conversation("Q?", "A.")},
               {"id": "two-images-one-marker", "image": ["0.png", "1.png"], "conversations": conversation("Q?", "A.")},
               {"id": "absolute-outside", "image": str(image_folder.parent / "outside.png"),
                "conversations": conversation("Q?", "A.")},
               {"id": "absolute-inside", "image": str(image_folder / "2.png"),
                "conversations": conversation("Q?", "A.")}]
    samples[0]["conversations"][0]["value"] = "Q?"
    result = validate_samples(samples, str(image_folder))
    found = {(e.sample_id, e.kind) for e in result.errors}
    assert found == {("marker-no-image", "image_marker_mismatch"), ("two-images-one-marker", "image_marker_mismatch"),
                     ("absolute-outside", "image_outside_folder")}
    # Inside the folder an absolute path works (training accepts it) but is flagged as not portable.
    assert {(w.sample_id, w.kind) for w in result.warnings} == {("absolute-outside", "absolute_image_path"),
                                                                ("absolute-inside", "absolute_image_path")}
    allowed = validate_samples(samples[3:], str(image_folder), allow_outside=True)
    assert allowed.errors == []


def test_rs_dataset_missing_and_truncated_jpeg(tmp_path, capsys):
    rs = write_rs_dataset(str(tmp_path))
    clean, report = tmp_path / "clean.json", tmp_path / "report.json"
    before = open(rs["data"], "rb").read()
    code = main(["--data", rs["data"], "--image-folder", rs["image_folder"], "--write-clean", str(clean),
                 "--report", str(report)])
    assert code == 1
    out = capsys.readouterr().out
    assert "sample 'nwpu-1'" in out and "missing_image" in out and "nwpu_1.jpg" in out
    assert "sample 'dota-1'" in out and "corrupt_image" in out and "truncated" in out
    kept = json.load(open(clean))
    assert len(kept) == rs["num_samples"] - 2
    assert {s["id"] for s in kept} == {s["id"] for s in json.load(open(rs["data"]))} - {"nwpu-1", "dota-1"}
    data = json.load(open(report))
    assert data["errors_by_kind"] == {"corrupt_image": 1, "missing_image": 1}
    assert [(d["id"], d["reasons"][0].split(":")[0]) for d in data["clean"]["dropped"]] == [
        ("nwpu-1", "missing_image"), ("dota-1", "corrupt_image")]
    assert open(rs["data"], "rb").read() == before
    # The cleaned file validates with exit code 0.
    assert main(["--data", str(clean), "--image-folder", rs["image_folder"]]) == 0


def test_refuses_to_overwrite_its_input_and_reads_jsonl(tmp_path, image_folder, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(_good(f"s{i}", f"{i}.png")) for i in range(3)) + "\n")
    before = path.read_bytes()
    assert main(["--data", str(path), "--image-folder", str(image_folder), "--write-clean", str(path)]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert path.read_bytes() == before
    out = tmp_path / "clean.jsonl"
    assert main(["--data", str(path), "--image-folder", str(image_folder), "--write-clean", str(out)]) == 0
    assert out.read_bytes() == before  # JSONL in, same JSONL out


def test_broken_json_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",,}\n]')
    assert main(["--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "line 3" in err


def test_token_lengths_truncation_and_lost_answers(tmp_path, image_folder):
    from data_tools.token_lengths import load_tokenizer

    long_answer = " ".join(["river"] * 40)
    samples = [
        {"id": "short", "image": "0.png", "conversations": conversation("What is it?", "A field.")},
        {"id": "three-turns", "image": "1.png",
         "conversations": conversation("Describe.", "Fields.") + [
             {"from": "human", "value": "More?"}, {"from": "gpt", "value": long_answer},
             {"from": "human", "value": "Even more?"}, {"from": "gpt", "value": long_answer}]},
        {"id": "first-too-long", "image": "2.png",
         "conversations": conversation("Describe.", " ".join(["lake"] * 200))},
    ]
    tokenizer = load_tokenizer(LLAMA2_TOKENIZER, "llava_v1")
    result = validate_samples(samples, str(image_folder), tokenizer=tokenizer, model_max_length=110,
                              num_image_tokens=8)
    assert [(e.sample_id, e.kind) for e in result.errors] == [("first-too-long", "too_long")]
    assert [(w.sample_id, w.kind) for w in result.warnings] == [("three-turns", "truncated")]
    assert "of 3 answer turn(s)" in result.warnings[0].message
    lengths = result.token_lengths
    assert lengths["truncated"] == 1 and lengths["lose_all_answers"] == 1 and lengths["count"] == 3
    assert lengths["min"] < 110 < lengths["max"]
    # Without a limit nothing is flagged, and the lengths are the same.
    free = validate_samples(samples, str(image_folder), tokenizer=tokenizer, num_image_tokens=8)
    assert free.errors == [] and free.warnings == [] and free.token_lengths["max"] == lengths["max"]


def test_model_max_length_needs_a_tokenizer(tmp_path, image_folder, capsys):
    path = _write(tmp_path / "d.json", [_good("a")])
    assert main(["--data", path, "--model-max-length", "100"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["validate", "filter", "prepare", "partition", "check_leakage", "convert",
                                  "synthesize", "stats"])
def test_help_runs_as_a_module(tool):
    done = subprocess.run([sys.executable, "-m", f"data_tools.{tool}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"python -m data_tools.{tool}" in done.stdout


def test_parallel_token_lengths_equal_sequential(monkeypatch, image_folder):
    from data_tools import token_lengths
    from data_tools.token_lengths import load_tokenizer, measure_token_lengths

    tokenizer = load_tokenizer(LLAMA2_TOKENIZER, "llava_v1")
    samples = [{"id": f"s{i}", "image": "0.png", "conversations": conversation("Q?", " ".join(["word"] * (1 + i * 7)))}
               for i in range(12)]
    samples.append({"id": "broken", "conversations": conversation("Q?", "A.")})  # marker without image
    sequential = measure_token_lengths(samples, list(range(len(samples))), tokenizer, num_image_tokens=4,
                                       model_max_length=60, workers=1)
    monkeypatch.setattr(token_lengths, "PARALLEL_MIN_SAMPLES", 1)
    monkeypatch.setattr(token_lengths, "CHUNK", 3)
    parallel = measure_token_lengths(samples, list(range(len(samples))), tokenizer, num_image_tokens=4,
                                     model_max_length=60, workers=2)
    assert parallel == sequential
    kinds = {index: kind for index, (kind, _) in sequential.problems.items()}
    assert kinds[12] == "bad_conversations" and "too_long" in kinds.values() and len(sequential.lengths) == 12
