"""llava_tiny.checks: every problem of a record listed, one message per rule for every user of it."""
import json

import pytest
from PIL import Image

from data_tools.validate import validate_samples
from eval.generate import expand_questions
from llava_tiny.checks import check_samples, inspect_image, record_problems
from llava_tiny.conversation import ConversationError, tokenize_conversation


def _turns(question="<image>\nWhat is it?", answer="a square"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "images" / "red.png")
    return tmp_path


def test_a_record_gets_every_problem_not_just_the_first():
    record = {"id": "s", "image": "a.png", "conversations": [
        {"from": "gpt", "value": "<image>\nx"}, {"from": "gpt", "value": "<image>"}, {"from": "human", "value": " "}]}
    kinds = [kind for kind, _ in record_problems(record)]
    assert kinds == ["bad_roles", "image_in_answer", "empty_turn", "bad_roles"]
    # the answer's marker is `image_in_answer`, not also a marker/image mismatch
    assert "image_marker_mismatch" not in kinds


def test_problems_name_file_sample_and_what_was_expected(folder):
    samples = [{"id": "ok", "image": "images/red.png", "conversations": _turns()},
               {"id": "two-markers", "image": "images/red.png", "conversations": _turns("<image><image>\nQ?")},
               {"id": "gone", "image": "images/blue.png", "conversations": _turns()}]
    checked = check_samples(samples, file="train.json", image_folder=str(folder), images="full")
    lines = [str(p) for p in checked.errors]
    assert lines[0] == ("train.json: sample 'two-markers': 2 <image> marker(s) but 1 image(s); "
                        "expected one image per marker")
    assert lines[1].startswith("train.json: sample 'gone': image 'images/blue.png' missing (not found: ")
    assert "expected an existing image file" in lines[1]
    assert checked.paths[0] == [str(folder / "images" / "red.png")]
    assert checked.images[str(folder / "images" / "red.png")].mode == "RGB"


def test_the_marker_rule_says_the_same_in_training_validate_and_generate(folder, tiny_parts):
    from transformers import AutoTokenizer

    from llava_tiny.conversation import prepare_tokenizer

    sample = {"id": "no-marker", "image": "images/red.png", "conversations": _turns("What is it?")}
    expected = "1 image(s) but 0 <image> marker(s); expected one marker per image"
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts["llm"])
    prepare_tokenizer(tokenizer, "llava_v1")
    with pytest.raises(ConversationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        tokenize_conversation(sample["conversations"], tokenizer, "llava_v1", 4, num_images=1, sample_id="no-marker")
    [error] = validate_samples([sample], str(folder)).errors
    assert (error.kind, error.message) == ("image_marker_mismatch", expected)
    with pytest.raises(ConversationError) as err:
        expand_questions([sample], str(folder))
    assert f"sample 'no-marker': {expected}" in str(err.value)


def test_missing_image_one_folder_down_says_where_it_is(folder):
    sample = {"id": "s", "image": "red.png", "conversations": _turns()}
    [error] = check_samples([sample], image_folder=str(folder)).errors
    assert error.kind == "missing_image"
    assert error.message.endswith("found at images/red.png: did you forget --image-prefix images?")
    too_deep = {"id": "t", "image": "images/red.png", "conversations": _turns()}
    [error] = check_samples([too_deep], image_folder=str(folder / "images")).errors
    assert "found at red.png: the paths carry one folder too many (images/)" in error.message
    nowhere = {"id": "u", "image": "blue.png", "conversations": _turns()}
    assert "found at" not in check_samples([nowhere], image_folder=str(folder)).errors[0].message


def test_transparent_pixels_are_told_from_an_opaque_alpha_channel(folder):
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    opaque.save(folder / "opaque.png")
    cut_out = opaque.copy()
    cut_out.putpixel((0, 0), (0, 0, 0, 0))
    cut_out.save(folder / "cut_out.png")
    assert inspect_image(str(folder / "opaque.png")).transparent is False
    assert inspect_image(str(folder / "cut_out.png")).transparent is True
    assert inspect_image(str(folder / "cut_out.png"), full=False).transparent is None  # headers cannot tell
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    kind, message = inspect_image(str(folder / "broken.png")).problem
    assert kind == "corrupt_image" and message.startswith("corrupt (") and json.dumps(message)
