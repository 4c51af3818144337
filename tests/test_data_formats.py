"""The data users bring: LLaVA JSON/JSONL, `messages` (OpenAI / TRL / LLaMA-Factory) and formatted `text`,
read by one reader (`llava_tiny.data.load_samples`) into one form that training, the checks,
`data_tools` and `eval.generate` share; bad records name the file, the record and what was expected.
Prediction lines that do not say whether they are captions or VQA are scored both ways."""
import json
import logging
import shutil

import pytest
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from data_tools.stats import describe
from data_tools.validate import main as validate_main
from data_tools.validate import validate_samples
from eval.generate import expand_questions
from eval.report import write_report
from eval.score import score_predictions
from llava_tiny.checks import check_length, check_samples
from llava_tiny.conversation import IGNORE_INDEX, prepare_tokenizer, tokenize_prompt, tokenize_sample
from llava_tiny.data import DataFileError, load_samples
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER
from llava_tiny.train.dataset import LazySupervisedDataset

LLAVA = {"id": "a", "image": "0.png", "conversations": [
    {"from": "human", "value": "What color?\n<image>"}, {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
MESSAGES = {"id": "a", "images": ["0.png"], "source": "mine", "messages": [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": [{"type": "text", "text": "What color?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": "Yes."}]}


def _write(path, records, jsonl=True):
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, f)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    prepare_tokenizer(tokenizer, "vicuna_v1")
    return tokenizer


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "0.png")
    return tmp_path


def test_messages_read_into_the_llava_form(tmp_path):
    [sample] = load_samples(_write(tmp_path / "m.jsonl", [MESSAGES]))
    assert sample["image"] == ["0.png"] and sample["source"] == "mine" and "messages" not in sample
    assert sample["system"] == "Answer in one word."
    assert [t["from"] for t in sample["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert sample["conversations"][0]["value"] == "What color?<image>"
    # LLaMA-Factory's sharegpt form: a leading system turn in `conversations`.
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, *LLAVA["conversations"]]}
    [read] = load_samples(_write(tmp_path / "s.json", [sharegpt], jsonl=False))
    assert read["system"] == "Be brief." and read["conversations"] == LLAVA["conversations"]


def test_messages_train_like_llava_with_their_system_prompt(tmp_path, tok):
    [from_messages] = load_samples(_write(tmp_path / "m.jsonl", [MESSAGES]))
    with_system = tokenize_sample({**LLAVA, "system": "Answer in one word."}, tok, "vicuna_v1", 3)
    ours = tokenize_sample(from_messages, tok, "vicuna_v1", 3)
    assert ours.input_ids == with_system.input_ids and ours.labels == with_system.labels
    text = tok.decode(ours.input_ids)
    assert text.startswith("<s> Answer in one word. USER:") and "curious" not in text
    plain = tokenize_sample(LLAVA, tok, "vicuna_v1", 3)
    assert "curious user" in tok.decode(plain.input_ids)


def test_text_records_supervise_every_token_and_warn_once(tmp_path, tok, folder, caplog):
    records = [{"id": "t1", "text": "USER: What is 2+2? ASSISTANT: 4"},
               {"id": "t2", "images": ["0.png"], "text": "<image>\nA red square."}]
    path = _write(folder / "t.jsonl", records)
    samples = load_samples(path)
    out = tokenize_sample(samples[0], tok, "vicuna_v1", 3)
    assert out.input_ids[0] == tok.bos_token_id and out.input_ids[-1] == tok.eos_token_id  # EOS appended, as TRL
    assert out.labels == [IGNORE_INDEX] + out.input_ids[1:]
    image = tokenize_sample(samples[1], tok, "vicuna_v1", 3)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image.input_ids.count(image_id) == 3 and image_id not in image.labels
    # A text-only model (no <image> token, no image placeholders) reads the same records.
    plain = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    assert tokenize_sample(samples[0], plain, "vicuna_v1", 0).input_ids == out.input_ids
    cut = tokenize_sample(samples[0], tok, "vicuna_v1", 3, model_max_length=5)
    assert cut.input_ids == out.input_ids[:5] and cut.dropped_turns == 1
    assert check_length(samples[1], "t2", tok, "vicuna_v1", 3, model_max_length=3).problem[0] == "too_long"
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    with caplog.at_level(logging.WARNING, logger="llava_tiny.train.dataset"):
        data = LazySupervisedDataset(path, tok, processor, "vicuna_v1", 3, image_folder=str(folder))
    warnings = [r.getMessage() for r in caplog.records if "formatted 'text'" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 2 records" in warnings[0] and "'messages'" in warnings[0]
    assert data[1]["pixel_values"].shape[-1] == 28 and data.modality_lengths == [-6, 4 + 3]  # words ("<image>" one) + image tokens


@pytest.mark.parametrize("record, kind, message", [
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "tool", "content": "x"}]}, "bad_roles",
     "message 1 has role 'tool'; expected 'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user", "content": 7}]}, "bad_conversations",
     "message 0 has content '7'; expected a string or a list of {type: text, text} / {type: image} parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "bad_conversations", "message 0 has content"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "system", "content": "S"}]}, "bad_roles",
     "message 1 is a system message after the conversation started"),
    ({"messages": []}, "bad_conversations", "'messages' is '[]'; expected a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "A."}, {"role": "user", "content": "Q?"}]}, "bad_roles",
     "turn 0 is from 'gpt'; expected 'human' (roles alternate human/gpt, user/assistant in 'messages'"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "images": ["0.png"]},
     "image_marker_mismatch", "1 image(s) but 0 <image> marker(s)"),
    ({"text": "   "}, "bad_conversations", "'text' is '   '; expected the formatted conversation as a string"),
    ({"text": "no marker", "image": "0.png"}, "image_marker_mismatch", "1 image(s) but 0 <image> marker(s)"),
    ({"question": "Q?", "answer": "A."}, "bad_conversations",
     "'conversations' is missing or empty; expected a non-empty list of {from, value} turns (or OpenAI-style "
     "'messages', or a formatted 'text')"),
])
def test_bad_records_name_the_file_the_record_and_what_was_expected(tmp_path, folder, record, kind, message):
    path = _write(tmp_path / "bad.jsonl", [{"id": "ok", "text": "fine"}, {"id": "r9", **record}])
    checked = check_samples(load_samples(path), file=path, image_folder=str(folder), images=None)
    problem = checked.errors[0]
    assert (problem.index, problem.sample_id, problem.kind) == (1, "r9", kind)
    assert str(problem).startswith(f"{path}: sample 'r9': ") and message in str(problem)


def test_a_record_that_is_not_an_object_names_the_formats(tmp_path):
    with pytest.raises(DataFileError, match=r"bad.jsonl: record 1 is a list; expected an object with 'conversations' "
                                            r"\(LLaVA\), 'messages' \(OpenAI/TRL\) or a formatted 'text'"):
        load_samples(_write(tmp_path / "bad.jsonl", [MESSAGES, ["x"]]))


def test_validate_stats_and_generate_read_the_same_formats(tmp_path, folder, tok, capsys):
    records = [MESSAGES, {"id": "t", "text": "USER: Tell me a story about the sea. ASSISTANT: "
                                                      "Once upon a time there was a boat on the sea."}, {**MESSAGES, "id": "b", "messages": [
        {"role": "user", "content": "Q?"}, {"role": "critic", "content": "no"}]}]
    path = _write(folder / "mixed.jsonl", records)
    assert validate_main(["--data", path, "--image-folder", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "'b'" in out and "message 1 has role 'critic'" in out and "'a'" not in out
    samples = load_samples(path)
    result = validate_samples(samples[:2], str(folder), tokenizer=tok, template="vicuna_v1", num_image_tokens=3,
                              model_max_length=28)
    assert not result.errors and [w.kind for w in result.warnings] == ["truncated", "truncated"]
    assert "the text would be cut there" in str(result.warnings[1])
    stats = describe(samples[:2])
    assert stats["turns"] == 2 and stats["answer_words"]["max"] == 1 and stats["images"] == 1
    with pytest.raises(ValueError, match="sample 't': a formatted 'text' record has no question to ask"):
        expand_questions(samples[:2], str(folder), file=path)
    questions = expand_questions(samples[:1], str(folder), file=path)
    assert [q.system for q in questions] == ["Answer in one word.", "Answer in one word."]
    assert questions[1].history == [("What color?<image>", "Red.")]
    assert tokenize_prompt(questions[0].question, tok, "vicuna_v1", 3, system=questions[0].system)[:8] == \
        tok("Answer in one word. USER:").input_ids[:8]


def test_eval_score_scores_lines_of_no_stated_kind_both_ways(tmp_path, monkeypatch):
    real_which = shutil.which  # no java: METEOR and the PTB tokenizer are skipped (slow to start; not the point)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
    lines = [{"id": f"c{i}", "prediction": p, "references": [r]} for i, (p, r) in enumerate([
        ("a red square on white", "a red square on a white background"), ("two blue dots", "two small blue dots")])]
    metrics = score_predictions(lines)
    assert metrics["Bleu_1"] > 0.5 and metrics["vqa_accuracy"] == 0.0  # a caption file: BLEU tells, exact match not
    assert metrics["counts"]["unlabelled"] == 2 and "--task caption" in metrics["task_unlabelled"]
    write_report(metrics, str(tmp_path))
    with open(tmp_path / "metrics.json") as f:
        assert "not labelled" in json.load(f)["task_unlabelled"]
    assert "**Kind not labelled.** 2 of 2 lines" in (tmp_path / "report.md").read_text()
    chosen = score_predictions(lines, task="caption")
    assert "task_unlabelled" not in chosen and "vqa_accuracy" not in chosen
    labelled = score_predictions([{**line, "task": "caption"} for line in lines])
    assert "task_unlabelled" not in labelled and labelled["Bleu_1"] == metrics["Bleu_1"]
