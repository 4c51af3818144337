"""Malformed LLaVA records, generated: the training dataset and `data_tools.validate` never crash
without naming the record. Each either accepts the data (and then every accepted sample loads) or
raises/reports an error that contains the bad record's id (or `#index` when it has none) or its
record/line number."""
import contextlib
import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlib import color_samples
from llava_tiny.model.builder import assemble_model
from llava_tiny.train.dataset import LazySupervisedDataset, load_samples, sample_id

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

odd = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
                st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
text = st.one_of(st.text(max_size=40), st.sampled_from(["<image>\nWhat color?", "<image><image> two", "red",
                                                        "   ", "x" * 3000]))
turn = st.one_of(odd, st.fixed_dictionaries(
    {}, optional={"from": st.one_of(st.sampled_from(["human", "gpt", "system", "user"]), odd),
                  "value": st.one_of(text, odd)}))
VALID_TURNS = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
conversations = st.one_of(odd, st.lists(turn, max_size=5), st.builds(lambda: [dict(t) for t in VALID_TURNS]))
image = st.one_of(odd, st.lists(st.one_of(odd, st.just("images/0.png")), max_size=3),
                  st.sampled_from(["images/0.png", "images/missing.png", "images", "", "../outside.png",
                                   "/etc/hostname", "images/\0.png", "images/0.png\n"]),
                  st.builds(lambda: ["images/0.png", "images/1.png"]))
# Ids that cannot be mistaken for text of an error message; None and a missing id give "#<index>".
bad_id = st.sampled_from(["bad-record", 987654, None, ["bad", 7], {"k": "bad"}])


@st.composite
def bad_record(draw):
    """A valid image sample with 1-3 things broken (or, now and then, not an object at all)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(odd.filter(lambda v: not isinstance(v, dict)))
    record = {"id": draw(bad_id), "image": "images/0.png", "conversations": [dict(t) for t in VALID_TURNS]}
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["id", "image", "conversations", "turn", "from", "value", "append", "drop"]))
        turns = record.get("conversations")
        dict_turns = [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
        if what in ("id", "image", "conversations"):
            if draw(st.booleans()):
                record.pop(what, None)
            else:
                record[what] = draw({"id": bad_id, "image": image, "conversations": conversations}[what])
        elif what == "turn" and isinstance(turns, list) and turns:
            turns[draw(st.integers(0, len(turns) - 1))] = draw(turn)
        elif what in ("from", "value") and dict_turns:
            target = draw(st.sampled_from(dict_turns))
            if draw(st.booleans()):
                target.pop(what, None)
            else:
                target[what] = draw(st.one_of(odd, text) if what == "value" else
                                    st.one_of(odd, st.sampled_from(["human", "gpt", "system"])))
        elif what == "append" and isinstance(turns, list):
            turns.append(draw(turn))
        elif what == "drop" and isinstance(turns, list) and turns:
            turns.pop(draw(st.integers(0, len(turns) - 1)))
    return record


def valid_samples(root) -> list[dict]:
    return [dict(s, id=f"good-{i}") for i, s in enumerate(color_samples(root, 3))]


def name_of(record, index: int) -> list[str]:
    """What an error about this record must contain (one of)."""
    if not isinstance(record, dict):
        return [f"record {index}"]
    return [sample_id(record, index), f"record {index}"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_parts):
    root = tmp_path_factory.mktemp("malformed")
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    return root, loaded, valid_samples(root)


def _dataset(loaded, path, folder, **kwargs):
    return LazySupervisedDataset(path, loaded.tokenizer, loaded.image_processor, loaded.template,
                                 loaded.model.config.image_seq_length, image_folder=folder, model_max_length=512,
                                 **kwargs)


@SETTINGS
@given(record=bad_record(), position=st.integers(0, 3), skip=st.booleans())
def test_training_dataset_accepts_or_names_the_bad_record(workspace, record, position, skip):
    root, loaded, good = workspace
    records = good[:position] + [record] + good[position:]
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    try:
        dataset = _dataset(loaded, path, str(root), skip_bad_samples=skip, max_bad_sample_fraction=1.0)
    except ValueError as err:
        assert any(name in str(err) for name in name_of(record, position)), str(err)
        return
    assert len(dataset) in (len(good), len(good) + 1)  # no good sample is lost
    if len(dataset) == len(good):
        assert any(name in dataset.skipped for name in name_of(record, position)), dataset.skipped
    for i in range(len(dataset)):
        item = dataset[i]
        assert int((item["labels"] != -100).sum()) > 0


@SETTINGS
@given(lines=st.lists(st.sampled_from(['{"id": "a", "conversations": []}', '{"id": "b"}', "5", "[1]", "",
                                       '{"id": "c", "conv', "{", "null", '"text"', "}{"]), min_size=2, max_size=6))
def test_load_samples_accepts_or_names_the_line_or_record(workspace, lines):
    root, _, _ = workspace
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    try:
        samples = load_samples(path)
    except ValueError as err:
        message = str(err)
        nonblank = [n for n, line in enumerate(lines, 1) if line.strip()]
        assert any(f"line {n} " in message for n in nonblank) or \
            any(f"record {i} " in message for i in range(len(nonblank))), message
        return
    assert all(isinstance(s, dict) for s in samples)


@SETTINGS
@given(record=bad_record(), position=st.integers(0, 3))
def test_data_tools_validate_accepts_or_names_the_bad_record(workspace, record, position):
    from data_tools import validate

    root, _, good = workspace
    records = good[:position] + [record] + good[position:]
    path = os.path.join(root, "validate.json")
    with open(path, "w") as f:
        json.dump(records, f)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = validate.main(["--data", path, "--image-folder", str(root), "--workers", "1"])
    if code != 0:
        text = out.getvalue() + err.getvalue()
        assert any(name in text for name in name_of(record, position)), text
