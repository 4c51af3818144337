"""eval.lmms_task writes an lmms-eval 0.7.3 task that asks what eval.generate asks. The peer is lmms-eval's
chat path for `--model llava_hf` (lmms_eval/models/chat/llava_hf.py: the images of `doc_to_messages`, the saved
processor's `apply_chat_template`, then the processor), replicated here with stock transformers because
lmms-eval is not a test dependency (scripts/compare_lmms_eval.sh runs the real one)."""
import importlib.util
import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image
from transformers import AutoProcessor

from conftest import write_color_dataset
from eval.generate import expand_questions
from eval.lmms_compare import compare, read_lmms_answers
from eval.lmms_task import write_task
from llava_tiny.data import load_samples
from llava_tiny.images import load_image, to_rgb
from llava_tiny.inference import build_prompt


@pytest.fixture(scope="module")
def vicuna_model(tmp_path_factory, llama2_llm, tiny_parts):
    """A saved tiny LLaVA with the real Llama-2 tokenizer and LLaVA-1.5's eval template (v1 = vicuna_v1)."""
    from llava_tiny.model.builder import assemble_model, load_pretrained_model

    path = str(tmp_path_factory.mktemp("vicuna") / "model")
    assemble_model(llama2_llm, tiny_parts["clip"], version="v1").save_pretrained(path)
    return path, load_pretrained_model(path, device="cpu")


def _split(root):
    """The color set plus what a split of ours may hold: two turns, a system message, a marker after the
    question, an RGBA image with colours under its transparent pixels, a text-only record."""
    path = write_color_dataset(str(root), n=3)
    samples = json.load(open(path))
    stamp = Image.new("RGBA", (40, 40), (200, 10, 10, 0))
    stamp.paste((10, 10, 200, 255), (10, 10, 30, 30))
    stamp.save(os.path.join(root, "images", "stamp.png"))
    samples += [
        {"id": "two-turns", "image": "images/0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "with-system", "image": "images/1.png", "system": "Answer in one word.", "conversations": [
            {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "a square"}]},
        {"id": "stamp", "image": "images/stamp.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Say one."}, {"from": "gpt", "value": "one"}]}]
    json.dump(samples, open(path, "w"))
    return path


def _load_utils(path):
    spec = importlib.util.spec_from_file_location("lmms_task_utils_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TaskLoader(yaml.SafeLoader):
    """lmms-eval's YAML: `!function utils.name` names a function of the task folder's utils.py."""


_TaskLoader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def test_the_task_parses_and_its_prompts_are_eval_generates(tmp_path, vicuna_model):
    model_path, loaded = vicuna_model
    data = _split(tmp_path / "data")
    written = write_task(data, str(tmp_path / "data"), str(tmp_path / "task"), max_new_tokens=24)
    config = yaml.load(open(written["yaml"]), Loader=_TaskLoader)
    assert config["task"] == "llava_tiny_data" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == written["data"] and os.path.isabs(written["data"])
    assert config["generation_kwargs"] == {"max_new_tokens": 24, "temperature": 0, "num_beams": 1, "do_sample": False}
    utils = _load_utils(written["utils"])
    for key in ("doc_to_messages", "doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        assert config[key] == ("function", f"utils.{key}") and callable(getattr(utils, key))

    docs = [json.loads(line) for line in open(written["data"])]
    questions = expand_questions(load_samples(data), str(tmp_path / "data"))
    assert questions[-1].id == "text" and written["text_only_left_out"] == 1  # llava_hf fails on them
    questions = questions[:-1]
    assert [d["id"] for d in docs] == [q.id for q in questions] == [
        "img-0", "img-1", "img-2", "two-turns#0", "two-turns#1", "with-system", "stamp"]
    processor = AutoProcessor.from_pretrained(model_path)
    for doc, question in zip(docs, questions):
        assert [os.path.realpath(tmp_path / "task" / p) for p in doc["image_paths"]] == question.image_paths
        messages = utils.doc_to_messages(doc)
        images = [c["url"] for m in messages for c in m["content"] if c["type"] == "image"]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        theirs = processor(images=images, text=text, return_tensors="pt")["input_ids"][0].tolist()
        ours_images = [to_rgb(load_image(p)) for p in question.image_paths]
        ours = build_prompt(loaded, question.question, ours_images, question.history, system=question.system)
        assert theirs == ours.input_ids, (doc["id"], text)
        for mine, reference in zip(images, ours_images):  # the stamp: blue on white, not on its hidden red
            assert np.array_equal(np.asarray(mine), np.asarray(reference)), doc["id"]
    with_system = processor.apply_chat_template(utils.doc_to_messages(docs[5]), tokenize=False,
                                                add_generation_prompt=True)
    assert with_system == "Answer in one word. USER: <image>\nWhat is shown? ASSISTANT:"  # marker first, as trained

    stamp = docs[-1]
    assert utils.doc_to_text(stamp) == "What colour is the square?" and utils.doc_to_target(stamp) == "Blue."
    assert utils.process_results(stamp, [" blue"]) == {"exact_match": 1.0}
    assert utils.process_results(stamp, ["red"]) == {"exact_match": 0.0}


def test_answers_are_matched_by_question_id_and_compared(tmp_path):
    """Peer: lmms-eval 0.7.3's --log_samples lines, as it wrote them for a task of ours (a document named by its
    row, `doc_id`; the decoded answer not stripped)."""
    task_data = tmp_path / "task.jsonl"
    task_data.write_text("".join(json.dumps({"id": i, "question": "?"}) + "\n" for i in ("a", "b", "c")))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(
        {"doc_id": row, "target": "x", "filtered_resps": answer, "token_counts": [{"output_tokens": 2}],
         "doc_hash": "74234e98", "input_media": ["../images/1.png"], "exact_match": 0.0, "input": "?"}) + "\n"
        for row, answer in ((0, " red"), (1, "blue"), (2, "one"))))
    lmms = read_lmms_answers(str(samples), str(task_data))
    assert lmms == {"a": " red", "b": "blue", "c": "one"}
    result = compare(lmms, {"a": "red", "b": "green", "d": "two"})
    assert (result["questions"], result["identical"], result["equal_stripped"]) == (2, 0, 1)
    assert result["differing"] == [{"id": "b", "lmms_eval": "blue", "eval_generate": "green"}]
    assert (result["only_lmms_eval"], result["only_eval_generate"]) == (1, 1)
