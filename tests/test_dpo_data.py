"""Preference records: both forms read the same, labels only on the final answer (built by the SFT
template code), bad pairs named by id before training and by data_tools.validate."""
import json
import os

import pytest
import torch

from dpo_data import write_preference_dataset
from llava_tiny.conversation import IGNORE_INDEX, tokenize_conversation
from llava_tiny.model.builder import assemble_model
from llava_tiny.preference import tokenize_preference
from llava_tiny.train.dataset import BadSamplesError
from llava_tiny.train.preference_dataset import PreferenceCollator, PreferenceDataset

BAD_PAIRS = [
    {"id": "no-prompt", "image": "images/0.png", "prompt": " ", "chosen": "red", "rejected": "blue"},
    {"id": "no-rejected", "image": "images/0.png", "prompt": "<image>\nColor?", "chosen": "red"},
    {"id": "same", "image": "images/0.png", "prompt": "<image>\nColor?", "chosen": "red", "rejected": "red "},
    {"id": "marker-in-answer", "image": "images/0.png", "prompt": "<image>\nColor?", "chosen": "<image> red",
     "rejected": "blue"},
    {"id": "no-marker", "image": "images/0.png", "prompt": "Color?", "chosen": "red", "rejected": "blue"},
    {"id": "messages-end-with-answer", "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}],
     "chosen": "a", "rejected": "b"},
]
KINDS = {"no-prompt": "no_prompt", "no-rejected": "missing_rejected", "same": "identical_answers",
         "marker-in-answer": "image_in_answer", "no-marker": "image_marker_mismatch",
         "messages-end-with-answer": "bad_roles"}


@pytest.fixture(scope="module")
def loaded(tiny_parts):
    return assemble_model(tiny_parts["llm"], tiny_parts["clip"], version="v1")


def _dataset(loaded, path, folder, **kwargs):
    return PreferenceDataset(path, loaded.tokenizer, loaded.image_processor, loaded.template,
                             loaded.model.config.image_seq_length, image_folder=folder, **kwargs)


def test_both_forms_give_the_same_pairs_with_labels_only_on_the_answer(tmp_path, loaded):
    next_path = write_preference_dataset(tmp_path, n=4, text_only=2, form="next")
    messages_path = write_preference_dataset(tmp_path, n=4, text_only=2, form="messages")
    a, b = _dataset(loaded, next_path, str(tmp_path)), _dataset(loaded, messages_path, str(tmp_path))
    assert len(a) == len(b) == 6
    for i in range(6):
        x, y = a[i], b[i]
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert torch.equal(x[key], y[key]), (i, key)
        pair = json.load(open(next_path))[i]
        # The chosen row is exactly the SFT tokenization of prompt + chosen answer (same template code).
        sft = tokenize_conversation([{"from": "human", "value": pair["prompt"]}, {"from": "gpt", "value": pair["chosen"]}],
                                    loaded.tokenizer, loaded.template, loaded.model.config.image_seq_length)
        assert x["chosen_input_ids"].tolist() == sft.input_ids and x["chosen_labels"].tolist() == sft.labels
        start = next(k for k, label in enumerate(x["rejected_labels"].tolist()) if label != IGNORE_INDEX)
        assert x["chosen_input_ids"][:start].tolist() == x["rejected_input_ids"][:start].tolist()  # shared prompt
        assert x["rejected_labels"][start:].tolist() == x["rejected_input_ids"][start:].tolist()
    batch = PreferenceCollator(loaded.tokenizer.pad_token_id)([a[0], a[1], a[4]])
    assert batch["input_ids"].shape[0] == 6 and batch["sample_ids"] == ["img-0", "img-1", "txt-0"]
    assert batch["pixel_values"].shape[0] == 4  # two image pairs, each image once per row
    assert batch["pair_index"].tolist() == [0, 1, 4]


def test_earlier_turns_are_context_only(loaded):
    pair = {"id": "multi", "conversations": [{"from": "human", "value": "Say one."}, {"from": "gpt", "value": "one"}],
            "prompt": "Say two.", "chosen": "two", "rejected": "three"}
    tokens = tokenize_preference(pair, loaded.tokenizer, loaded.template, 4, sample_id="multi")
    supervised = [t for t, label in zip(tokens.chosen.input_ids, tokens.chosen.labels) if label != IGNORE_INDEX]
    only_answer = tokenize_conversation([{"from": "human", "value": "Say two."}, {"from": "gpt", "value": "two"}],
                                        loaded.tokenizer, loaded.template, 4)
    assert supervised == [t for t, label in zip(only_answer.input_ids, only_answer.labels) if label != IGNORE_INDEX]
    with pytest.raises(Exception, match="never truncated"):
        tokenize_preference(pair, loaded.tokenizer, loaded.template, 4, model_max_length=10, sample_id="multi")


def test_bad_pairs_are_named_by_id_before_training(tmp_path, loaded):
    path = write_preference_dataset(tmp_path, n=2)
    good = json.load(open(path))
    sft = {"id": "sft", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    with open(tmp_path / "bad.json", "w") as f:
        json.dump(good + BAD_PAIRS + [sft], f)
    with pytest.raises(BadSamplesError) as err:
        _dataset(loaded, str(tmp_path / "bad.json"), str(tmp_path))
    message = str(err.value)
    for sid in [*KINDS, "sft"]:
        assert f"  {sid}: " in message, sid
    assert "  img-0:" not in message and "not a preference record" in message and "the same text" in message


def test_validate_reports_bad_pairs_by_kind(tmp_path, capsys):
    from data_tools import validate

    path = write_preference_dataset(tmp_path, n=3)
    with open(tmp_path / "bad.json", "w") as f:
        json.dump(json.load(open(path)) + BAD_PAIRS, f)
    report = tmp_path / "report.json"
    assert validate.main(["--data", path, "--image-folder", str(tmp_path)]) == 0
    assert validate.main(["--data", str(tmp_path / "bad.json"), "--image-folder", str(tmp_path),
                          "--report", str(report)]) == 1
    found = {e["sample_id"]: e["kind"] for e in json.load(open(report))["errors"]}
    assert found == KINDS
    assert "duplicate_sample" not in capsys.readouterr().out  # pairs over one image are not duplicates


def test_validate_measures_pair_lengths_with_the_tokenizer(tmp_path, tiny_parts):
    from data_tools import validate

    path = write_preference_dataset(tmp_path, n=2)
    report = tmp_path / "report.json"
    assert validate.main(["--data", path, "--image-folder", str(tmp_path), "--tokenizer", tiny_parts["llm"],
                          "--version", "v1", "--num-image-tokens", "16", "--model-max-length", "20",
                          "--report", str(report)]) == 1
    assert {e["kind"] for e in json.load(open(report))["errors"]} == {"too_long"}
    assert os.path.isfile(report)


def test_convert_preference_from_an_rlaifv_style_parquet(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from data_tools import convert, validate

    def png(color):
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), color).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = [{"image": png("red"), "question": "What color is it?", "chosen": "Red.", "rejected": "Blue.",
             "ds_name": "colors", "idx": 0},
            {"image": png("red"), "question": "Is it red?", "chosen": "Yes.", "rejected": "No.", "ds_name": "colors",
             "idx": 1},
            {"image": png("blue"), "question": "Color?", "chosen": "Blue.", "rejected": "Blue.", "ds_name": "x",
             "idx": 2},
            {"image": png("blue"), "question": "Color?", "chosen": "Blue.", "rejected": "", "ds_name": "x", "idx": 3}]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "rlaifv.parquet"))
    out, report = tmp_path / "pairs.json", tmp_path / "report.json"
    assert convert.main(["preference", "--input", str(tmp_path / "rlaifv.parquet"), "--out", str(out),
                         "--image-folder", str(tmp_path), "--image-subdir", "rlaifv", "--id-column", "idx",
                         "--id-prefix", "rlaifv-", "--report", str(report)]) == 0
    pairs = json.load(open(out))
    assert [p["id"] for p in pairs] == ["rlaifv-0", "rlaifv-1"]
    assert pairs[0]["prompt"] == "<image>\nWhat color is it?" and pairs[0]["chosen"] == "Red."
    assert pairs[0]["rejected"] == "Blue." and pairs[0]["ds_name"] == "colors"
    assert pairs[0]["image"] == pairs[1]["image"] and (tmp_path / pairs[0]["image"]).is_file()  # written once
    assert [s["reason"] for s in json.load(open(report))["skipped"]] == [
        "chosen and rejected are the same answer", "empty rejected"]
    assert validate.main(["--data", str(out), "--image-folder", str(tmp_path)]) == 0


def test_pairs_from_a_models_mistakes(tmp_path):
    """scripts/dpo_pairs.py (the DPO demo's pairs): every distinct wrong answer, greedy or sampled, is a pair."""
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mistake_pairs = runpy.run_path(os.path.join(root, "scripts", "dpo_pairs.py"))["mistake_pairs"]
    samples = [{"id": f"q{i}", "image": f"{i}.png", "question_type": "color", "conversations": [
        {"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": answer}]}
        for i, answer in enumerate(["red", "blue", "green"])]
    greedy = [{"id": "q0", "prediction": "Red."}, {"id": "q1", "prediction": "red"}, {"id": "q2", "prediction": "green"}]
    sampled = [{"id": "q0", "prediction": "red"}, {"id": "q1", "prediction": "yellow"}, {"id": "q2", "prediction": "red"}]
    pairs = mistake_pairs(samples, greedy + sampled)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("q1", "blue", "red"), ("q1#1", "blue", "yellow"), ("q2", "green", "red")]
    assert pairs[0]["prompt"] == "<image>\nColor?" and pairs[0]["image"] == "1.png" and "conversations" not in pairs[0]
