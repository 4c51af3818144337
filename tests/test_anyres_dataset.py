"""The dataset under anyres: each `<image>` expands to its own image's count, equal to the `<image>` run stock
`LlavaNextProcessor` writes for that image (one and two images per sample, text-only beside them); tiles equal
the stock image processor's; the collator pads tiles to the batch's most; the check's bound never lets a sample
through that an image could cut into."""
import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from llava_tiny.anyres import AnyresTiling, PinpointsError, anyres_max_image_tokens, anyres_num_image_tokens
from llava_tiny.conversation import prepare_tokenizer
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER
from llava_tiny.train.dataset import BadSamplesError, DataCollatorForSupervisedDataset, LazySupervisedDataset

from test_anyres import _noise, _stock_processor

TOWER = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
PINPOINTS = "(1x1),...,(3x3)"
SIZES = {"strip.png": (200, 20), "tall.png": (20, 200), "square.png": (32, 32), "big.png": (300, 200),
         "dot.png": (5, 5)}


def _turns(question, answer="a shape"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def anyres_data(tmp_path):
    for name, (width, height) in SIZES.items():
        _noise(width, height).save(tmp_path / name)
    records = [{"id": name, "image": name, "conversations": _turns("<image>\nWhat is it?")} for name in SIZES]
    records.append({"id": "two", "image": ["tall.png", "big.png"],
                    "conversations": _turns("<image>\n<image>\nDo the two images show the same colour?", "no")})
    records.append({"id": "text", "conversations": _turns("Hi?", "hello")})
    (tmp_path / "data.json").write_text(json.dumps(records))
    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    prepare_tokenizer(tokenizer, "vicuna_v1")
    return tmp_path, records, tokenizer


def _dataset(root, tokenizer, model_max_length=4096):
    tower = CLIPImageProcessor(**TOWER)
    return LazySupervisedDataset(str(root / "data.json"), tokenizer, tower, "vicuna_v1", 16, image_folder=str(root),
                                 model_max_length=model_max_length,
                                 anyres=AnyresTiling.for_tower(PINPOINTS, tower, patch_size=8))


def _runs(ids, token_id):
    """Lengths of the runs of `token_id` in `ids`, in order."""
    runs, previous = [], None
    for token in ids:
        if token == token_id:
            if previous == token_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    return runs


def test_each_image_takes_the_stock_processors_count(anyres_data, tmp_path_factory):
    root, records, tokenizer = anyres_data
    grids = [[32 * rows, 32 * cols] for rows in (1, 2, 3) for cols in (1, 2, 3)]  # (1x1),...,(3x3) by hand
    stock, _ = _stock_processor(tmp_path_factory.mktemp("stock"), CLIPImageProcessor(**TOWER), 8, grids)
    dataset = _dataset(root, tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    for index, record in enumerate(records):
        item = dataset[index]
        names = record.get("image", [])
        names = [names] if isinstance(names, str) else names
        images = [Image.open(root / name).convert("RGB") for name in names]
        expected = [stock(images=[image], text=["<image>"])["input_ids"][0].count(stock.image_token_id)
                    for image in images]
        assert _runs(item["input_ids"].tolist(), image_token_id) == expected, record["id"]
        if not images:
            assert "pixel_values" not in item
            continue
        pixels = stock.image_processor(images=images, return_tensors="pt")
        assert torch.equal(item["pixel_values"], pixels["pixel_values"]), record["id"]
        assert item["image_sizes"].tolist() == pixels["image_sizes"].tolist()
    counts = {record["id"]: _runs(dataset[i]["input_ids"].tolist(), image_token_id) for i, record in enumerate(records)}
    assert len({tuple(c) for c in counts.values()}) >= 5  # sizes give different counts, not one for all
    assert counts["two"] == [counts["tall.png"][0], counts["big.png"][0]]  # each image its own, in order


def test_the_collator_pads_tiles_to_the_batchs_most(anyres_data):
    root, records, tokenizer = anyres_data
    dataset = _dataset(root, tokenizer)
    items = [dataset[i] for i in range(len(records))]
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id or 0)(items)
    with_images = [item for item in items if "pixel_values" in item]
    most = max(item["pixel_values"].shape[1] for item in with_images)
    assert most == 1 + 6  # big.png (300x200): 2x3 tiles (64x96 keeps as many pixels as 96x96, wastes fewer)
    assert batch["pixel_values"].shape == (7, most, 3, 32, 32)  # 5 single-image samples + 2 images of one
    assert batch["image_sizes"].tolist() == [list(reversed(SIZES[name]))
                                             for name in [*SIZES, "tall.png", "big.png"]]
    square = batch["pixel_values"][2]  # square.png: one 1x1 tile after the overview, then zeros
    assert torch.equal(square[:2], items[2]["pixel_values"][0]) and not square[2:].any()


def test_the_check_counts_every_image_at_the_most_it_can_take(anyres_data):
    """Peer: the largest 3x3 grid of a 32-px tower with 8-px patches: 12*12 + 12 newlines + 16 = 172."""
    root, records, tokenizer = anyres_data
    tower = CLIPImageProcessor(**TOWER)
    tiling = AnyresTiling.for_tower(PINPOINTS, tower, 8)
    assert tiling.max_image_tokens == 172 == anyres_num_image_tokens(96, 96, [list(p) for p in tiling.pinpoints], 32, 8)
    assert all(anyres_num_image_tokens(w, h, [list(p) for p in tiling.pinpoints], 32, 8) <= 172
               for w in (1, 7, 50, 95, 96, 97, 500, 4000) for h in (1, 9, 64, 96, 300, 4000))
    # The check opens no image: room for two images of 172 each is needed before the two-image sample is let
    # through, though its own images (20x200 and 300x200) take fewer; the single-image samples all fit.
    pinpoints = [list(p) for p in tiling.pinpoints]
    own = sum(anyres_num_image_tokens(*SIZES[name], pinpoints, 32, 8) for name in ("tall.png", "big.png"))
    assert own + 55 < 2 * 172 + 10
    with pytest.raises(BadSamplesError, match=r"1 of 7 samples cannot be used:\n  two: the first turn needs \d+ "
                                              r"tokens \(344 of them image placeholders\)"):
        _dataset(root, tokenizer, model_max_length=2 * 172 + 10)
    assert anyres_max_image_tokens([[32, 96], [96, 32]], 32, 8) == 12 * 4 + 12 + 16  # the tall grid: 12 newlines


def test_a_tower_view_that_is_not_square_is_refused():
    with pytest.raises(PinpointsError, match="square tower view"):
        AnyresTiling.for_tower(PINPOINTS, CLIPImageProcessor(size={"height": 32, "width": 48}, do_center_crop=False),
                               8)


def test_a_collated_batch_feeds_stock_llava_next(anyres_data):
    """Peer: stock `LlavaNextForConditionalGeneration` (tiny, written from stock configs) takes the batch: its
    unpadded features per image fill exactly the placeholders, for one and two images per sample and text-only
    rows, with tiles padded to the batch's most."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    root, records, tokenizer = anyres_data
    batch = DataCollatorForSupervisedDataset(0)([_dataset(root, tokenizer)[i] for i in range(len(records))])
    grids = [[32 * rows, 32 * cols] for rows in (1, 2, 3) for cols in (1, 2, 3)]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=grids,
        vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    assert out.logits.shape[:2] == batch["input_ids"].shape  # stock checks placeholders == features, or raises
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    runs = [run for row in batch["input_ids"].tolist() for run in _runs(row, config.image_token_id)]
    assert [f.shape[0] for f in features] == runs  # image by image, in order
