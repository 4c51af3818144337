"""Batched, resumable generation: batches equal one-by-one decoding, output lines are complete and
resumable, multi-turn samples give one line per turn."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from eval.generate import blank_image, expand_questions, generate_predictions, read_finished_ids
from llava_tiny.conversation import ConversationError
from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch, left_pad
from llava_tiny.model.builder import load_pretrained_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red.png": ((200, 30, 30), (70, 56)), "green.png": ((20, 160, 40), (56, 90)),
           "blue.png": ((30, 40, 210), (56, 56)), "stripes.png": (None, (84, 60))}


def _image(colour, size):
    if colour is not None:
        return Image.new("RGB", size, colour)
    img = Image.new("RGB", size, (255, 255, 255))
    for x in range(0, size[0], 8):
        img.paste((0, 0, 0), (x, 0, x + 4, size[1]))
    return img


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_pretrained_model(model_dir, device="cpu")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenes")
    for name, (colour, size) in COLOURS.items():
        _image(colour, size).save(folder / name)
    return str(folder)


SAMPLES = [
    {"id": "q1", "image": "red.png", "conversations": _turns(("<image>\nWhat color is it?", "red")),
     "answer_type": "color", "question_type": "what", "source": "synthetic", "label": "red",
     "extra": {"not": "plain"}},
    {"id": "q2", "image": "green.png",
     "conversations": _turns(("Describe the picture in detail, with many words about the scene, please.\n<image>",
                              "a green field"))},
    {"id": "text-only", "conversations": _turns(("What is two and three?", "five"))},
    {"id": "chat", "image": "blue.png",
     "conversations": _turns(("<image>\nHow many objects?", "one"), ("And the shape?", "a square"),
                             ("Color?", "blue"))},
    {"id": "refs", "image": ["stripes.png", "red.png"],
     "conversations": _turns(("<image>\n<image>\nCompare the two images.", "stripes and red")),
     "references": ["stripes and red", "a striped image and a red one"], "answer_type": "caption"},
]


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_batched_generation_equals_one_by_one(loaded, image_folder):
    questions = expand_questions(SAMPLES, image_folder)
    prompts = [build_prompt(loaded, q.question, [Image.open(p).convert("RGB") for p in q.image_paths], q.history)
               for q in questions]
    lengths = {len(p.input_ids) for p in prompts}
    assert len(lengths) >= 4 and any(not p.images for p in prompts)  # padding and a text-only row are exercised
    settings = GenerationSettings(max_new_tokens=12)
    one_by_one = [generate_batch(loaded, [p], settings)[0] for p in prompts]
    assert generate_batch(loaded, prompts, settings) == one_by_one
    assert generate_batch(loaded, prompts[::-1], settings) == one_by_one[::-1]
    assert len(set(one_by_one)) > 1 and all(one_by_one)  # a real model answers differently per prompt


def test_left_padded_rows_get_positions_from_their_first_token(loaded, image_folder):
    """The LM must see positions 0..n-1 for a left-padded row, as the row alone would."""
    prompts = [build_prompt(loaded, "<image>\nWhat color is it?", [Image.open(os.path.join(image_folder, "red.png"))]),
               build_prompt(loaded, "Hi?")]
    seen = []
    language_model = loaded.model.model.language_model
    hook = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True)
    try:
        generate_batch(loaded, prompts, GenerationSettings(max_new_tokens=2))
    finally:
        hook.remove()
    _, mask, expected = left_pad([p.input_ids for p in prompts], 0)
    prefill = seen[0]
    assert prefill is not None, "no position_ids reached the LM: it numbers left-padded rows from the padding"
    short = len(prompts[1].input_ids)
    assert prefill[1, -short:].tolist() == list(range(short))
    assert torch.equal(prefill[mask.bool()], expected[mask.bool()])
    assert seen[1][:, -1].tolist() == [len(prompts[0].input_ids), short]  # the first new token continues each row


def test_the_prefill_computes_the_vocabulary_logits_of_the_last_position_only(loaded, image_folder):
    """generate() passes logits_to_keep=1 only to a forward whose signature names it: a batch of 16 long
    image prompts would otherwise hold batch x prompt x vocabulary logits for one position's use."""
    prompts = [build_prompt(loaded, "<image>\nWhat color is it?", [Image.open(os.path.join(image_folder, "red.png"))]),
               build_prompt(loaded, "Hi?")]
    rows = []
    hook = loaded.model.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[1]))
    try:
        generate_batch(loaded, prompts, GenerationSettings(max_new_tokens=3))
    finally:
        hook.remove()
    assert rows and all(positions == 1 for positions in rows), rows


def test_prediction_lines_multi_turn_and_passthrough(loaded, image_folder, tmp_path):
    out = tmp_path / "preds.jsonl"
    counts = generate_predictions(loaded, SAMPLES, image_folder, str(out), batch_size=3, max_new_tokens=8,
                                  progress=False)
    assert counts == {"questions": 7, "skipped": 0, "written": 7}
    lines = {r["id"]: r for r in _read(out)}
    assert list(lines) == ["q1", "q2", "text-only", "chat#0", "chat#1", "chat#2", "refs"]
    assert lines["q1"] == {"id": "q1", "image": "red.png", "question": "What color is it?",
                           "references": ["red"], "answer_type": "color", "question_type": "what",
                           "source": "synthetic", "label": "red", "prediction": lines["q1"]["prediction"]}
    assert lines["q2"]["question"] == "Describe the picture in detail, with many words about the scene, please."
    assert lines["text-only"]["image"] is None and "answer_type" not in lines["text-only"]
    assert lines["chat#1"]["question"] == "And the shape?" and lines["chat#1"]["references"] == ["a square"]
    assert lines["refs"]["references"] == ["stripes and red", "a striped image and a red one"]
    assert lines["refs"]["image"] == ["stripes.png", "red.png"]
    # Turn 2 was prompted with the ground-truth turns 0 and 1 (not the model's own answers) as history.
    blue = Image.open(os.path.join(image_folder, "blue.png")).convert("RGB")
    history = [("<image>\nHow many objects?", "one"), ("And the shape?", "a square")]
    expected = generate_batch(loaded, [build_prompt(loaded, "Color?", [blue], history)],
                              GenerationSettings(max_new_tokens=8))[0]
    assert lines["chat#2"]["prediction"] == expected
    without_history = generate_batch(loaded, [build_prompt(loaded, "<image>\nColor?", [blue])],
                                     GenerationSettings(max_new_tokens=8))[0]
    assert without_history != expected


def test_resume_drops_a_half_written_line_and_skips_finished_ids(loaded, image_folder, tmp_path):
    full = tmp_path / "full.jsonl"
    generate_predictions(loaded, SAMPLES, image_folder, str(full), batch_size=2, max_new_tokens=8, progress=False)
    reference = full.read_text()
    lines = reference.splitlines(keepends=True)
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed mid-write of line 4
    counts = generate_predictions(loaded, SAMPLES, image_folder, str(resumed), batch_size=2, max_new_tokens=8,
                                  progress=False)
    assert counts == {"questions": 7, "skipped": 3, "written": 4}
    assert resumed.read_text() == reference
    again = generate_predictions(loaded, SAMPLES, image_folder, str(resumed), batch_size=2, max_new_tokens=8,
                                 progress=False)
    assert again["written"] == 0 and resumed.read_text() == reference


def test_a_foreign_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text('{"id": "a", "prediction": "x"}\nnot json\n{"id": "b", "prediction": "y"}\n')
    with pytest.raises(ValueError, match="line 2 is not a prediction record"):
        read_finished_ids(str(out))
    out.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "pred')
    assert read_finished_ids(str(out)) == {"a"}
    assert out.read_text() == '{"id": "a", "prediction": "x"}\n'


def test_blank_images_are_mean_coloured_copies_of_the_same_size(loaded, image_folder, tmp_path):
    """--blank-images answers exactly as if every image file were a mean-colour image of its size."""
    processor = loaded.image_processor
    blank = blank_image((84, 60), processor)
    assert blank.size == (84, 60)
    assert blank.getpixel((10, 10)) == tuple(round(m * 255) for m in processor.image_mean)
    blanked_folder = tmp_path / "blanked"
    blanked_folder.mkdir()
    for name in COLOURS:
        with Image.open(os.path.join(image_folder, name)) as img:
            blank_image(img.size, processor).save(blanked_folder / name)
    generate_predictions(loaded, SAMPLES, image_folder, str(tmp_path / "blind.jsonl"), batch_size=4,
                         max_new_tokens=8, blank_images=True, progress=False)
    generate_predictions(loaded, SAMPLES, str(blanked_folder), str(tmp_path / "files.jsonl"), batch_size=4,
                         max_new_tokens=8, progress=False)
    generate_predictions(loaded, SAMPLES, image_folder, str(tmp_path / "seeing.jsonl"), batch_size=4,
                         max_new_tokens=8, progress=False)
    blind = _read(tmp_path / "blind.jsonl")
    assert blind == _read(tmp_path / "files.jsonl")
    assert [r["prediction"] for r in blind] != [r["prediction"] for r in _read(tmp_path / "seeing.jsonl")]


@pytest.mark.parametrize("sample, message", [
    ({"id": "a", "image": "missing.png", "conversations": _turns(("<image>\nQ?", "A"))}, "not found: .*missing.png"),
    ({"id": "b", "image": "red.png", "conversations": _turns(("Q?", "A"))}, "1 image\\(s\\) but 0 <image> marker"),
    ({"id": "c", "conversations": [{"from": "human", "value": "Q?"}]}, "expected human/gpt pairs"),
    ({"id": "d", "conversations": _turns(("Q?", "A"), ("Q2?", "B")), "references": ["x"]},
     "one list of strings per turn"),
    ({"id": "q1", "conversations": _turns(("Q?", "A"))}, "question ids repeat .*q1"),
])
def test_bad_data_is_refused_before_generation(image_folder, sample, message):
    with pytest.raises(ConversationError, match=message):
        expand_questions([SAMPLES[0], sample], image_folder)


def test_beam_search_refuses_multi_image_prompts(loaded, image_folder):
    images = [Image.open(os.path.join(image_folder, n)).convert("RGB") for n in ("red.png", "blue.png")]
    prompt = build_prompt(loaded, "<image>\n<image>\nCompare.", images)
    with pytest.raises(ValueError, match="beam search .* several images"):
        generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=4, num_beams=2))
    single = build_prompt(loaded, "<image>\nColor?", images[:1])
    assert len(generate_batch(loaded, [single, build_prompt(loaded, "Hi")],
                              GenerationSettings(max_new_tokens=4, num_beams=2))) == 2


def _many_samples(n):
    names = list(COLOURS)
    samples = []
    for i in range(n):
        if i % 5 == 4:
            samples.append({"id": f"s{i}", "conversations": _turns((f"Say {i} words about numbers.", "ok"))})
        else:
            samples.append({"id": f"s{i}", "image": names[i % len(names)],
                            "conversations": _turns(("<image>\n" + "Describe it. " * (1 + i % 3), "a picture"))})
    return samples


def _generate_cmd(model_dir, data, image_folder, out):
    return [sys.executable, "-m", "eval.generate", "--model-path", model_dir, "--data", str(data),
            "--image-folder", image_folder, "--out", str(out), "--batch-size", "4", "--max-new-tokens", "24"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_file(model_dir, image_folder, tmp_path):
    """SIGKILL a real `python -m eval.generate` after its first batch lands, rerun it: same lines as one run."""
    data = tmp_path / "data_test.json"
    samples = _many_samples(160)
    data.write_text(json.dumps(samples))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    uninterrupted = tmp_path / "uninterrupted.jsonl"
    subprocess.run(_generate_cmd(model_dir, data, image_folder, uninterrupted), check=True, env=env, cwd=REPO,
                   capture_output=True)
    out = tmp_path / "preds.jsonl"
    proc = subprocess.Popen(_generate_cmd(model_dir, data, image_folder, out), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.stat().st_size):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; give it more work"
    landed = out.read_text().count("\n")
    assert 0 < landed < len(samples)
    subprocess.run(_generate_cmd(model_dir, data, image_folder, out), check=True, env=env, cwd=REPO,
                   capture_output=True)
    records = _read(out)
    assert len(records) == len({r["id"] for r in records}) == len(samples)
    assert sorted(records, key=lambda r: r["id"]) == sorted(_read(uninterrupted), key=lambda r: r["id"])
    assert out.read_text() == uninterrupted.read_text()  # same order too: the data's
