"""A saved folder prepares images exactly as training did, for every `--image_aspect_ratio`, when read by
stock transformers (`AutoProcessor.from_pretrained`, what lmms-eval, vLLM and SGLang call) in a process that
imports nothing of ours. Peers: LLaVA's own `expand2square` + the tower's CLIP processor (training's `pad`),
and stock transformers' `LlavaImageProcessor` (the saved processor)."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from llava_tiny.images import image_settings, preprocess_images
from llava_tiny.model.builder import assemble_model, load_pretrained_model

# Non-square sizes users have (scans, charts, scenes), one square, and images with transparency.
SIZES = [(64, 32), (30, 90), (57, 111), (200, 13), (56, 56)]


def expand2square(pil_img, background_color):
    """LLaVA's own (haotian-liu/LLaVA, llava/mm_utils.py), verbatim: the oracle of `pad`."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _images(folder) -> list[str]:
    """Noise images of SIZES (RGB), one RGBA with a transparent half, one palette image with a transparent entry."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i, (width, height) in enumerate(SIZES):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
        paths.append(os.path.join(folder, f"rgb-{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    rgba = torch.randint(0, 256, (48, 80, 4), generator=generator, dtype=torch.uint8)
    rgba[:, :40, 3] = 0
    paths.append(os.path.join(folder, "alpha.png"))
    Image.fromarray(rgba.numpy(), "RGBA").save(paths[-1])
    palette = Image.fromarray(rgba[..., :3].numpy()).convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    paths.append(os.path.join(folder, "palette.png"))
    palette.save(paths[-1], transparency=0)
    return paths


def _open(path):
    """As training opens a file (`llava_tiny.images.load_image`, which keeps transparency)."""
    from llava_tiny.images import load_image

    return load_image(path)


def test_pad_is_llavas_expand2square_then_the_towers_processor(tiny_parts, tmp_path):
    tower_processor = AutoImageProcessor.from_pretrained(tiny_parts["clip"])
    mean = tuple(int(x * 255) for x in tower_processor.image_mean)
    for path in _images(str(tmp_path))[:len(SIZES)]:
        image = Image.open(path).convert("RGB")
        llava = tower_processor.preprocess(expand2square(image, mean), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(preprocess_images([image], tower_processor, "pad"), llava, atol=1e-6, rtol=0)


STOCK_READER = r"""
import json, sys
import numpy as np
from PIL import Image
from transformers import AutoProcessor
folders, paths, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
arrays = {}
for mode, folder in folders.items():
    processor = AutoProcessor.from_pretrained(folder)
    for i, path in enumerate(paths):
        arrays[f"{mode}-{i}"] = processor.image_processor(Image.open(path), return_tensors="np")["pixel_values"]
np.savez(out, **arrays)
assert not [m for m in sys.modules if m.split(".")[0] in ("llava_tiny", "data_tools", "eval", "bench")]
"""


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_stock_autoprocessor_prepares_images_as_training_did(tiny_parts, tmp_path, tower):
    import numpy as np

    loaded = assemble_model(tiny_parts["llm"], tiny_parts[tower])
    tower_processor = AutoImageProcessor.from_pretrained(tiny_parts[tower])  # what training starts from
    folders = {}
    for mode in ("pad", "square", "resize"):
        loaded.model.config.image_aspect_ratio = mode  # as train.py records --image_aspect_ratio
        folders[mode] = str(tmp_path / mode)
        loaded.save_pretrained(folders[mode])
        assert json.load(open(os.path.join(folders[mode], "config.json")))["image_aspect_ratio"] == mode
    paths = _images(str(tmp_path))
    out = str(tmp_path / "stock.npz")
    result = subprocess.run([sys.executable, "-c", STOCK_READER, json.dumps(folders), json.dumps(paths), out],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=""),
                            cwd=str(tmp_path))  # cwd: the stock process cannot import this repository
    assert result.returncode == 0, result.stderr[-3000:]
    stock = np.load(out)
    for mode in folders:
        for i, path in enumerate(paths):
            training = preprocess_images([_open(path)], tower_processor, mode, "white").numpy()
            assert stock[f"{mode}-{i}"].shape == training.shape, (mode, path)
            difference = float(np.abs(stock[f"{mode}-{i}"] - training).max())
            assert difference <= 1e-4, f"{mode} {os.path.basename(path)}: stock differs from training by {difference}"


def test_serving_and_evaluation_read_the_recorded_settings(tiny_parts, tmp_path, caplog):
    """Loaders default to the folder's recorded image settings; a setting stock readers cannot follow is said."""
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    loaded.model.config.image_aspect_ratio, loaded.model.config.image_background = "square", "mean"
    with caplog.at_level(logging.WARNING):
        loaded.save_pretrained(str(tmp_path / "m"))
    assert "composite transparent pixels onto white" in caplog.text
    config = load_pretrained_model(str(tmp_path / "m")).model.config
    assert image_settings(config) == ("square", "mean")
    assert image_settings(config, "resize", "white") == ("resize", "white")  # a flag given still wins
