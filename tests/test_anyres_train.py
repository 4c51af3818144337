"""A tiny anyres run through the real `train()`: a LLaVA-1.5 checkpoint fine-tuned with LLaVA-NeXT's flags learns,
trains image_newline with the projector, and saves a stock `llava_next` folder that stock transformers (in a
subprocess importing nothing of ours) loads and generates from as this project does. Flag combinations that
cannot run are refused by name."""
import json
import os

import pytest
import torch
from PIL import Image

from conftest import required_flags
from llava_tiny.model.anyres_model import with_anyres
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.model.checkpoint_kinds import LLAVA_NEXT
from llava_tiny.model.checkpoints import resolve_kind
from llava_tiny.train import train as train_module
from llava_tiny.train.arguments import FlagError, parse_args
from llava_tiny.train.recipes import make_recipe

from test_anyres_model import _run_stock

ANYRES = ["--image_aspect_ratio", "anyres", "--image_grid_pinpoints", "(1x1),...,(2x2)",
          "--mm_patch_merge_type", "spatial_unpad"]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


@pytest.fixture(scope="module")
def wide_and_tall(tmp_path_factory):
    """Four samples, images of four shapes (one tile to a 2x2 grid), one sample with two images."""
    root = tmp_path_factory.mktemp("anyres-data")
    sizes = [(120, 40), (40, 110), (100, 100), (50, 50)]
    records = []
    for i, ((width, height), colour) in enumerate(zip(sizes, COLOURS)):
        Image.new("RGB", (width, height), COLOURS[colour]).save(root / f"{i}.png")
        records.append({"id": f"img-{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": colour}]})
    records[3] = {"id": "two", "image": ["3.png", "0.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nDo the two images show the same colour?"},
        {"from": "gpt", "value": "no"}]}
    (root / "data.json").write_text(json.dumps(records))
    return {"data_path": str(root / "data.json"), "image_folder": str(root)}


def test_anyres_finetuning_from_a_llava_checkpoint_learns_and_saves_a_stock_llava_next_folder(
        tmp_path, model_dir, wide_and_tall):
    out = tmp_path / "out"
    train_module.train(argv=[
        "--model_name_or_path", model_dir, *ANYRES, "--data_path", wide_and_tall["data_path"],
        "--image_folder", wide_and_tall["image_folder"], "--output_dir", str(out), "--per_device_train_batch_size",
        "4", "--max_steps", "8", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--seed", "0"])
    losses = [e["loss"] for e in json.load(open(out / "trainer_state.json"))["log_history"] if "loss" in e]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses

    config = json.load(open(out / "config.json"))
    assert config["model_type"] == "llava_next" and config["image_aspect_ratio"] == "anyres"
    assert config["image_grid_pinpoints"] == [[56, 56], [56, 112], [112, 56], [112, 112]]
    assert resolve_kind(str(out)) is LLAVA_NEXT
    stock = _run_stock(str(out), wide_and_tall["image_folder"], ["0.png", "1.png"], tmp_path / "stock.pt")
    assert stock["pinpoints"] == config["image_grid_pinpoints"]
    ours = load_pretrained_model(str(out), device="cpu")
    for result in stock["results"]:
        inputs = {k: result[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
        with torch.no_grad():
            assert (ours.model(**inputs).logits - result["logits"]).abs().max() < 1e-4
        assert ours.model.generate(**inputs, max_new_tokens=4, do_sample=False).tolist() == \
            result["generated"].tolist()


def test_image_newline_trains_with_the_projector(tmp_path, tiny_parts, model_dir):
    args = parse_args(required_flags(tmp_path) + [*ANYRES,
                                                  "--mm_projector_lr", "1e-4"])
    loaded = with_anyres(assemble_model(tiny_parts["llm"], tiny_parts["clip"]), "(1x1),...,(2x2)")
    recipe = make_recipe(args.model, args.training)
    model = recipe.prepare(loaded.model)
    assert recipe.checkpoint_kind is LLAVA_NEXT
    newline = model.model.image_newline
    group = next(g for g in recipe.parameter_groups(model, 0.0) if any(p is newline for p in g["params"]))
    assert newline.requires_grad and group["lr"] == 1e-4

    frozen = parse_args(required_flags(tmp_path) + [*ANYRES,
                                                    "--freeze_mm_mlp_adapter", "True"])
    make_recipe(frozen.model, frozen.training).prepare(loaded.model)
    assert not newline.requires_grad


@pytest.mark.parametrize("flags, named", [
    (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad"], "needs --image_grid_pinpoints"),
    (["--image_aspect_ratio", "anyres", "--image_grid_pinpoints", "(1x1),...,(2x2)"], "spatial_unpad"),
    (["--image_grid_pinpoints", "(1x1),...,(2x2)"], "only with --image_aspect_ratio anyres"),
    (["--mm_patch_merge_type", "spatial_unpad"], "spatial_unpad"),
    (["--mm_patch_merge_type", "maxpool"], "expected flat"),
    ([*ANYRES[:2], "--image_grid_pinpoints", "[[56, 112], [0]]", *ANYRES[4:]], "pinpoint [0]"),
])
def test_anyres_flags_that_cannot_run_are_refused_by_name(tmp_path, flags, named):
    with pytest.raises(FlagError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_args(required_flags(tmp_path) + flags)


def test_a_llava_next_start_without_anyres_is_refused(tmp_path, tiny_parts, wide_and_tall):
    folder = str(tmp_path / "next")
    with_anyres(assemble_model(tiny_parts["llm"], tiny_parts["clip"]), "(1x1),...,(2x2)").save_pretrained(folder)
    with pytest.raises(FlagError, match="LLaVA-NeXT.*--image_aspect_ratio anyres"):
        train_module.train(argv=["--model_name_or_path", folder, "--data_path", wide_and_tall["data_path"],
                                 "--image_folder", wide_and_tall["image_folder"], "--output_dir", str(tmp_path / "o"),
                                 "--max_steps", "1", "--report_to", "none"])
    assert os.path.isdir(folder)
