"""A new projector is one builder registered in one place, also one that changes the number of image tokens:
registered here, in the test, a projector that pools 2 x 2 patches is built by the training command, its
count (a quarter of the tower's) is what the data expands `<image>` to, it trains, saves, reloads through
`load_pretrained_model`, and the saved stock `LlavaProcessor` (peer: transformers' own, loaded with
`AutoProcessor`) expands `<image>` to the same count."""
import json

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor

from conftest import write_color_dataset
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.model.projector import (PROJECTORS, MlpProjector, build_projector, projector_image_tokens,
                                        register_projector)
from llava_tiny.train import train as train_module


class PooledProjector(nn.Module):
    """Average-pool k x k patches of the square feature grid, then a linear layer: k^2 times fewer tokens."""

    def __init__(self, k: int, vision_hidden_size: int, text_hidden_size: int, bias: bool):
        super().__init__()
        self.k, self.linear_1 = k, nn.Linear(vision_hidden_size, text_hidden_size, bias=bias)

    def forward(self, features):  # [images, side * side, hidden]
        images, tokens, hidden = features.shape
        side = int(tokens ** 0.5)
        grid = features.transpose(1, 2).reshape(images, hidden, side, side)
        pooled = nn.functional.avg_pool2d(grid, self.k).flatten(2).transpose(1, 2)
        return self.linear_1(pooled)


@pytest.fixture
def pooled_projector():
    @register_projector(r"avgpool(\d)_linear", image_tokens=lambda features: features // 4)
    def build(match, vision_hidden_size, text_hidden_size, bias):
        return PooledProjector(int(match.group(1)), vision_hidden_size, text_hidden_size, bias)

    yield "avgpool2_linear"
    PROJECTORS.pop()


def test_a_projector_that_pools_patches_is_one_registered_builder(tmp_path, tiny_parts, pooled_projector):
    tower_tokens = assemble_model(tiny_parts["llm"], tiny_parts["clip"]).model.config.image_seq_length
    root = tmp_path / "data"
    data = write_color_dataset(str(root), n=8, seed=2)
    out = tmp_path / "out"
    train_module.train(argv=[
        "--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts["clip"], "--mm_projector_type",
        pooled_projector, "--data_path", data, "--image_folder", str(root), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--max_steps", "6", "--learning_rate", "3e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0"])
    losses = [e["loss"] for e in json.load(open(out / "trainer_state.json"))["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]

    loaded = load_pretrained_model(str(out))
    assert isinstance(loaded.model.model.multi_modal_projector, PooledProjector)
    assert loaded.model.config.image_seq_length == tower_tokens // 4 == projector_image_tokens(pooled_projector,
                                                                                               tower_tokens)
    stock = AutoProcessor.from_pretrained(str(out))
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    inputs = stock(images=image, text="USER: <image>\nWhat color? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == loaded.model.config.image_token_id).sum()) == tower_tokens // 4
    with torch.no_grad():  # the stock processor's inputs run through the reloaded model: counts agree
        assert torch.isfinite(loaded.model(**inputs).logits).all()


def test_the_built_in_projectors_keep_their_names_and_shapes():
    assert isinstance(build_projector("mlp2x_gelu", 8, 16), MlpProjector)
    assert build_projector("mlp3x_gelu", 8, 16).depth == 3 and build_projector("linear", 8, 16).depth == 1
    assert projector_image_tokens("mlp2x_gelu", 576) == 576
    with pytest.raises(ValueError, match="equal hidden sizes"):
        build_projector("identity", 8, 16)
    for bad in ("mlp0x_gelu", "mlp2x_relu", "conv"):
        with pytest.raises(ValueError, match=f"unknown mm_projector_type '{bad}'; expected a name matching"):
            build_projector(bad, 8, 16)
