"""Batched generation with images of several sizes, several images per prompt and text-only prompts in ONE batch,
for a LLaVA-1.5 (pad) and an anyres (LLaVA-NeXT) model: our prompt ids and greedy tokens (`inference.generate_ids`)
equal the stock peer's, stock transformers' `AutoProcessor` (`LlavaProcessor` / `LlavaNextProcessor`, its chat
template) and `generate()` of `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` on the same saved
folder, in a subprocess that imports nothing of ours."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from llava_tiny.inference import GenerationSettings, ImageReader, build_prompt, generate_batch, generate_ids, probe_inputs
from llava_tiny.model.builder import load_pretrained_model
from llava_tiny.conversation import stop_token_ids

# (question, image sizes as (width, height)): two images of different shapes, text only, one tall, one wide.
BATCH = [("Do the two images show the same colour?", [(150, 40), (56, 56)]),
         ("Say the number 3.", []),
         ("What colour is it?", [(40, 130)]),
         ("What shape is it?", [(120, 90)])]
NEW_TOKENS = 6

STOCK_PEER = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
images_dir, batch, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
for folder, stops, out in json.loads(sys.argv[4]):
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    texts, images = [], []
    for question, names in batch:
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        images += [Image.open(f"{images_dir}/{name}") for name in names]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops,
                                   pad_token_id=processor.tokenizer.pad_token_id)
    torch.save({"model": type(model).__name__, "processor": type(processor).__name__,
                "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                "new": generated[:, inputs["input_ids"].shape[1]:]}, out)
"""

STOCK_CLASSES = {"pad": ("LlavaForConditionalGeneration", "LlavaProcessor"),
                 "anyres": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor")}


def _image(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


def test_a_mixed_batch_generates_the_stock_peers_tokens(tmp_path, model_dir, anyres_dir):
    batch, images, seed = [], [], 0
    for question, sizes in BATCH:
        names = []
        for width, height in sizes:
            seed += 1
            names.append(f"image{seed}.png")
            _image(width, height, seed).save(tmp_path / names[-1])
        batch.append((question, names))
        images.append([Image.open(tmp_path / name) for name in names])
    models = {"pad": load_pretrained_model(model_dir, device="cpu"),
              "anyres": load_pretrained_model(anyres_dir, device="cpu")}
    stops = {kind: stop_token_ids(loaded.tokenizer, loaded.template) for kind, loaded in models.items()}
    jobs = [(folder, stops[kind], str(tmp_path / f"{kind}.pt")) for kind, folder in (("pad", model_dir),
                                                                                   ("anyres", anyres_dir))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours is importable there
    done = subprocess.run([sys.executable, "-c", STOCK_PEER, str(tmp_path), json.dumps(batch), str(NEW_TOKENS),
                           json.dumps(jobs)], capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]

    for kind, loaded in models.items():
        stock = torch.load(tmp_path / f"{kind}.pt", weights_only=True)
        assert (stock["model"], stock["processor"]) == STOCK_CLASSES[kind]
        prompts = [build_prompt(loaded, "<image>\n" * len(row) + question, row)
                   for (question, _), row in zip(BATCH, images)]
        reader = ImageReader.of(loaded)
        counts = [reader.counts(prompt.images) for prompt in prompts]
        if kind == "anyres":  # each image its own count: the batch really mixes them
            assert len({c for row in counts for c in row}) == 4, counts
        for row, prompt in enumerate(prompts):  # the same ids: template, markers, each image's placeholder count
            real = stock["attention_mask"][row].bool()
            assert stock["input_ids"][row][real].tolist() == prompt.input_ids, (kind, row)
            assert prompt.input_ids.count(loaded.model.config.image_token_id) == sum(counts[row])
        ours = generate_ids(loaded, prompts, stops[kind], GenerationSettings(max_new_tokens=NEW_TOKENS))
        assert ours == stock["new"].tolist(), kind


def test_an_anyres_model_refuses_another_aspect_ratio(anyres_dir):
    loaded = load_pretrained_model(anyres_dir, device="cpu")
    prompt = build_prompt(loaded, "<image>\nWhat?", [_image(60, 30, 0)])
    with pytest.raises(ValueError, match="reads images as tiles only"):
        generate_ids(loaded, [prompt], [], GenerationSettings(max_new_tokens=1, image_aspect_ratio="pad"))
    probe = probe_inputs(loaded)  # the parity probe of merge/export: a wide image, several tiles, its size
    assert probe["image_sizes"].tolist() == [[56, 84]] and probe["pixel_values"].shape[1] > 2


def test_eval_generate_batches_an_anyres_model_with_two_images_per_sample(tmp_path, anyres_dir):
    """`python -m eval.generate` on an anyres folder, records of two, one and no images in one batch: each
    prediction is the one its question gets alone (batch 1)."""
    from eval.generate import main

    for name, (width, height) in {"wide.png": (150, 40), "tall.png": (40, 130), "square.png": (56, 56)}.items():
        _image(width, height, width).save(tmp_path / name)
    records = [{"id": "two", "image": ["wide.png", "tall.png"], "conversations": [
                   {"from": "human", "value": "<image>\n<image>\nDo the two images show the same colour?"},
                   {"from": "gpt", "value": "no"}]},
               {"id": "one", "image": "square.png", "conversations": [
                   {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]},
               {"id": "text", "conversations": [
                   {"from": "human", "value": "Say the number 3."}, {"from": "gpt", "value": "3"}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "preds.jsonl"
    assert main(["--model-path", anyres_dir, "--data", str(tmp_path / "data.json"), "--image-folder", str(tmp_path),
                 "--out", str(out), "--batch-size", "3", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    predictions = {line["id"]: line["prediction"] for line in map(json.loads, out.read_text().splitlines())}
    assert sorted(predictions) == ["one", "text", "two"] and any(predictions.values())
    loaded = load_pretrained_model(anyres_dir, device="cpu")
    for record in records:
        paths = record.get("image", [])
        images = [Image.open(tmp_path / p) for p in ([paths] if isinstance(paths, str) else paths)]
        prompt = build_prompt(loaded, record["conversations"][0]["value"], images)
        alone = generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=6))[0]
        assert predictions[record["id"]] == alone, record["id"]
