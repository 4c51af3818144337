"""Training on records of two images each (the synthetic "Do the two images show the same colour?" question,
two `<image>` markers per record) through the real `train()`, for a LLaVA-1.5 (pad) model and an anyres one: the
loss falls, and the saved folder reads a two-image prompt (each image its placeholders) and generates."""
import json

import pytest

from data_tools.synthesize import synthesize
from llava_tiny.inference import GenerationSettings, ImageReader, build_prompt, generate_batch
from llava_tiny.images import load_image
from llava_tiny.model.builder import load_pretrained_model
from llava_tiny.train import train as train_module

ANYRES = ["--image_aspect_ratio", "anyres", "--image_grid_pinpoints", "(1x1),...,(2x2)",
          "--mm_patch_merge_type", "spatial_unpad"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    path = synthesize(str(root), num_images=16, image_size=48, seed=0, objects="alike", question_types=["same-color"])
    return {"data_path": path, "image_folder": str(root), "records": json.load(open(path))}


@pytest.mark.parametrize("aspect", ["pad", "anyres"])
def test_two_image_records_train(tmp_path, model_dir, pairs, aspect):
    out = tmp_path / "out"
    train_module.train(argv=[
        "--model_name_or_path", model_dir, *(ANYRES if aspect == "anyres" else []), "--data_path",
        pairs["data_path"], "--image_folder", pairs["image_folder"], "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--max_steps", "6", "--learning_rate", "3e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0"])
    losses = [e["loss"] for e in json.load(open(out / "trainer_state.json"))["log_history"] if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses

    loaded = load_pretrained_model(str(out), device="cpu")
    record = pairs["records"][0]
    images = [load_image(f"{pairs['image_folder']}/{path}") for path in record["image"]]
    prompt = build_prompt(loaded, record["conversations"][0]["value"], images)
    counts = ImageReader.of(loaded).counts(images)
    assert prompt.input_ids.count(loaded.model.config.image_token_id) == sum(counts) and len(counts) == 2
    assert isinstance(generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=2))[0], str)
