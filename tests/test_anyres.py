"""llava_tiny.anyres against stock transformers: the `<image>` count `LlavaNextProcessor` expands to and the
pixel values `LlavaNextImageProcessor` gives, for many image sizes, pinpoint sets and tower sizes."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlavaNextImageProcessor,
                          LlavaNextProcessor, SiglipImageProcessor)

from llava_tiny.anyres import (PinpointsError, anyres_num_image_tokens, anyres_pixel_values, best_resolution,
                               parse_grid_pinpoints, tile_grid)
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER

LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's own
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# (width, height): tiny, smaller than a tile, square, 1:10 and 10:1, odd sizes, huge.
SIZES = [(1, 1), (3, 5), (7, 7), (31, 33), (32, 32), (40, 30), (64, 64), (50, 500), (500, 50), (100, 1000),
         (1000, 100), (97, 211), (211, 97), (336, 336), (337, 671), (640, 480), (480, 640), (1008, 336),
         (1500, 1000), (4000, 3000), (3000, 4000), (4000, 400)]

# (tower processor as users have it, patch size, pinpoints flag)
TOWERS = {
    "clip32-range": (lambda: CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                     8, "(1x1),...,(3x3)"),
    "clip32-list": (lambda: CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                    8, "[[32,64],[64,32],[64,64],[96,32],[32,96],[128,128]]"),
    "siglip64-range": (lambda: SiglipImageProcessor(size={"height": 64, "width": 64}), 16, "(1x1),...,(2x2)"),
    "clip336-llava-next": (lambda: CLIPImageProcessor(size={"shortest_edge": 336},
                                                      crop_size={"height": 336, "width": 336}),
                           14, str(LLAVA_NEXT_PINPOINTS)),
}


def _stock_processor(tmp_path, tower, patch_size, pinpoints):
    """A `llava_next` processor folder as llava-hf's conversion writes one (stock transformers only), read back."""
    tile = tower.crop_size["height"] if tower.do_center_crop else tower.size["height"]
    settings = dict(size=tower.size, crop_size=tower.crop_size, do_center_crop=tower.do_center_crop,
                    image_mean=tower.image_mean, image_std=tower.image_std, resample=tower.resample)
    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    LlavaNextProcessor(image_processor=LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, **settings),
                       tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(tmp_path)
    return AutoProcessor.from_pretrained(tmp_path), tile


def _noise(width, height, seed=0):
    rng = np.random.default_rng(seed + width * 7 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", TOWERS)
def test_token_count_matches_the_stock_processor(tmp_path, name):
    make_tower, patch_size, flag = TOWERS[name]
    tower = make_tower()
    stock, tile = _stock_processor(tmp_path, tower, patch_size, parse_grid_pinpoints(flag, tower.size.get(
        "shortest_edge") or tower.size["height"]))
    pinpoints = parse_grid_pinpoints(flag, tile)
    sizes = SIZES if tile < 336 else SIZES[::3]  # the 336 px tower's tiles are slow to make on a CPU
    images = [_noise(w, h) for w, h in sizes]
    batch = stock(images=images, text=["<image> what is it?"] * len(images))
    counted = [ids.count(stock.image_token_id) for ids in batch["input_ids"]]
    ours = [anyres_num_image_tokens(w, h, pinpoints, tile, patch_size) for w, h in sizes]
    assert ours == counted, list(zip(sizes, ours, counted))
    assert len(set(ours)) > 2  # the sizes exercise several grids, not one count


@pytest.mark.parametrize("name", ["clip32-range", "siglip64-range", "clip336-llava-next"])
def test_tiles_match_the_stock_image_processor(tmp_path, name):
    make_tower, patch_size, flag = TOWERS[name]
    tower = make_tower()
    stock, tile = _stock_processor(tmp_path, tower, patch_size, parse_grid_pinpoints(flag, tower.size.get(
        "shortest_edge") or tower.size["height"]))
    sizes = [(3, 5), (50, 500), (500, 50), (97, 211), (1500, 1000)]
    images = [_noise(w, h, seed=1) for w, h in sizes]
    ours = anyres_pixel_values(images, tower, parse_grid_pinpoints(flag, tile))
    expected = stock.image_processor(images=images, return_tensors="pt")
    assert ours["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])
    assert ours["image_sizes"].tolist() == [[h, w] for w, h in sizes]
    rows, cols = tile_grid(1500, 1000, parse_grid_pinpoints(flag, tile), tile)
    real_tiles = ours["pixel_values"][-1].abs().flatten(1).sum(1) > 0
    assert int(real_tiles.sum()) == 1 + rows * cols  # the overview, then rows x cols tiles, then zero padding


def test_transparent_pixels_become_the_background():
    tower = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clear = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    pinpoints = parse_grid_pinpoints("(1x1),...,(2x2)", 32)
    white = anyres_pixel_values([clear], tower, pinpoints)["pixel_values"]
    expected = anyres_pixel_values([Image.new("RGB", (40, 20), "white")], tower, pinpoints)["pixel_values"]
    assert torch.equal(white, expected)
    mean = anyres_pixel_values([clear], tower, pinpoints, background="mean")["pixel_values"]
    assert mean[0, 0].abs().max() < 0.01  # the mean colour normalises to ~0


def test_range_form_expands_as_llava_next_train_py():
    """Peer: LLaVA-NeXT's train.py expansion written out by hand for (1x1),...,(3x3) at 336 px."""
    assert parse_grid_pinpoints("(1x1),...,(3x3)", 336) == [
        [336, 336], [336, 672], [336, 1008], [672, 336], [672, 672], [672, 1008],
        [1008, 336], [1008, 672], [1008, 1008]]
    assert parse_grid_pinpoints("(1x2),(2x3)", 32) == [[32, 64], [32, 96], [64, 64], [64, 96]]
    assert parse_grid_pinpoints(str(LLAVA_NEXT_PINPOINTS), 336) == LLAVA_NEXT_PINPOINTS
    assert parse_grid_pinpoints(LLAVA_NEXT_PINPOINTS, 336) == LLAVA_NEXT_PINPOINTS


@pytest.mark.parametrize("flag, found", [("[[336,600]]", "[336, 600]"), ("[[336]]", "[336]"), ("[]", "non-empty"),
                                         ("[[336, 672]", "not a list"), ("(3x)", "expected a list"), ("3 by 3", "expected a list"),
                                         ("[[0, 336]]", "[0, 336]")])
def test_unusable_pinpoints_are_refused(flag, found):
    with pytest.raises(PinpointsError, match="--image_grid_pinpoints") as error:
        parse_grid_pinpoints(flag, 336)
    assert found in str(error.value)


def test_best_resolution_keeps_the_most_pixels():
    """Peer: by hand. A 1000x100 strip keeps most pixels at 336x1008 (h x w); a large square at 672x672; a
    tiny image (every pinpoint keeps all of it) at the one wasting least."""
    assert best_resolution(1000, 100, LLAVA_NEXT_PINPOINTS) == (336, 1008)
    assert best_resolution(2000, 2000, LLAVA_NEXT_PINPOINTS) == (672, 672)
    assert best_resolution(10, 10, LLAVA_NEXT_PINPOINTS) == (336, 672)
    assert tile_grid(1000, 100, LLAVA_NEXT_PINPOINTS, 336) == (1, 3)
