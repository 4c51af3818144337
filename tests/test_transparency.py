"""Transparent images: what the file stores under transparent pixels never reaches the model. Training,
generation and the CLI composite onto white (or the processor's mean colour); validate warns."""
import json
import random

import pytest
import torch
from PIL import Image

from data_tools.validate import validate_samples
from eval.generate import generate_predictions
from llava_tiny.images import preprocess_images
from llava_tiny.model import builder
from llava_tiny.serve import cli
from llava_tiny.train.dataset import LazySupervisedDataset

SIZE = (40, 40)
STAMP = (30, 90, 200)  # the opaque object in the middle


def _stamp_on(background) -> Image.Image:
    """The picture as a person sees it: the stamp on `background`."""
    image = Image.new("RGB", SIZE, background)
    image.paste(STAMP, (10, 10, 30, 30))
    return image


def _rgba_with_garbage() -> Image.Image:
    """The same stamp, RGBA, with random colours stored under the transparent pixels."""
    rng = random.Random(0)
    image = Image.new("RGBA", SIZE)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256), 0) for _ in range(SIZE[0] * SIZE[1])])
    image.paste((*STAMP, 255), (10, 10, 30, 30))
    return image


@pytest.fixture(scope="module")
def loaded(tiny_parts):
    torch.manual_seed(0)
    return builder.assemble_model(tiny_parts["llm"], tiny_parts["clip"])


@pytest.fixture
def data(tmp_path):
    _rgba_with_garbage().save(tmp_path / "stamp.png")
    samples = [{"id": "stamp", "image": "stamp.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a stamp"}]}]
    (tmp_path / "data.json").write_text(json.dumps(samples))
    return tmp_path


def _mean(loaded):
    return tuple(int(round(x * 255)) for x in loaded.image_processor.image_mean)


def _seen_by_tower(loaded):
    """Pixel values the vision tower receives, recorded by a forward hook."""
    seen = []
    loaded.model.model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


def test_training_composites_onto_white_or_the_mean_colour(loaded, data):
    for background, colour in (("white", (255, 255, 255)), ("mean", _mean(loaded))):
        dataset = LazySupervisedDataset(str(data / "data.json"), loaded.tokenizer, loaded.image_processor,
                                        loaded.template, loaded.model.config.image_seq_length,
                                        image_folder=str(data), image_background=background)
        expected = preprocess_images([_stamp_on(colour)], loaded.image_processor)
        assert torch.equal(dataset[0]["pixel_values"], expected), background
    garbage = preprocess_images([_rgba_with_garbage().convert("RGB")], loaded.image_processor)
    assert not torch.equal(garbage, expected)  # what a plain convert("RGB") would have fed the model


def test_generation_and_cli_see_the_composited_image(loaded, data, tmp_path, monkeypatch):
    seen = _seen_by_tower(loaded)
    samples = json.loads((data / "data.json").read_text())
    generate_predictions(loaded, samples, str(data), str(tmp_path / "preds.jsonl"), max_new_tokens=1, progress=False)
    expected = preprocess_images([_stamp_on((255, 255, 255))], loaded.image_processor)
    assert torch.equal(seen[0].float(), expected)

    monkeypatch.setattr(builder, "load_pretrained_model", lambda *args, **kwargs: loaded)
    seen.clear()
    out = tmp_path / "answer.txt"
    with open(out, "w") as stdout:
        assert cli.main(["--model-path", "unused", "--image-file", str(data / "stamp.png"), "--query", "What?",
                         "--max-new-tokens", "1", "--image-background", "mean"], stdout=stdout) == 0
    expected_mean = preprocess_images([_stamp_on(_mean(loaded))], loaded.image_processor)
    assert torch.equal(seen[0].float(), expected_mean)


def test_validate_warns_and_reports_modes(data):
    Image.new("LA", (8, 8), (128, 255)).save(data / "grey_opaque.png")
    samples = json.loads((data / "data.json").read_text())
    samples.append({"id": "grey", "image": "grey_opaque.png", "conversations": samples[0]["conversations"]})
    result = validate_samples(samples, str(data))
    assert result.errors == []
    assert [(w.sample_id, w.kind) for w in result.warnings] == [("stamp", "transparent_image")]
    assert "stamp.png" in result.warnings[0].message and "white" in result.warnings[0].message
    assert result.image_modes == {"RGBA": 1, "LA": 1}
