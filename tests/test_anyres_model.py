"""The anyres model: a LLaVA-1.5 model made LLaVA-NeXT, saved as a stock `llava_next` folder that stock transformers
(in a subprocess importing nothing of ours) loads and generates from with the same logits for several image sizes;
a stock `llava_next` folder written with stock transformers alone is a `llava_next` checkpoint this project loads."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from llava_tiny.anyres import AnyresTiling
from llava_tiny.model.anyres_model import with_anyres
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.model.checkpoint_kinds import LLAVA_NEXT
from llava_tiny.model.checkpoints import kind_saving, resolve_kind
from llava_tiny.model.modeling_next import LlavaTinyNextForCausalLM

PINPOINTS = "(1x1),...,(2x2)"  # tiles of the tiny tower's 56 px
SIZES = [(56, 56), (150, 40), (40, 130), (120, 90), (20, 20)]  # (width, height)

# The peer: stock transformers only. Loads the folder, runs each image through its own processor, writes the inputs,
# the logits and a greedy continuation.
STOCK_PEER = r"""
import json, sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
folder, images_dir, out = sys.argv[1:4]
model = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
results = []
for name in json.loads(sys.argv[4]):
    inputs = processor(text="USER: <image>\nWhat colour is it? ASSISTANT:", images=Image.open(f"{images_dir}/{name}"),
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    results.append({k: v for k, v in inputs.items()} | {"logits": logits, "generated": generated})
torch.save({"type": type(processor).__name__, "pinpoints": processor.image_processor.image_grid_pinpoints,
            "results": results}, out)
"""


def _image(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _run_stock(folder, images_dir, names, out):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of ours is importable there
    done = subprocess.run([sys.executable, "-c", STOCK_PEER, folder, str(images_dir), str(out), json.dumps(names)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(images_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def anyres_source(request, tiny_parts):
    torch.manual_seed(0)
    loaded = with_anyres(assemble_model(tiny_parts["llm"], tiny_parts[request.param]), PINPOINTS)
    with torch.no_grad():  # image_newline visibly part of the features
        loaded.model.model.image_newline.mul_(10)
    return loaded


def test_a_converted_llava_is_a_stock_llava_next_folder_with_the_same_logits(tmp_path, anyres_source):
    source = anyres_source
    assert isinstance(source.model, LlavaTinyNextForCausalLM)
    assert kind_saving(source.model) is LLAVA_NEXT
    folder = str(tmp_path / "model")
    source.save_pretrained(folder)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "llava_next" and config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == [[56, 56], [56, 112], [112, 56], [112, 112]]
    assert resolve_kind(folder) is LLAVA_NEXT

    names = []
    for seed, (width, height) in enumerate(SIZES):
        names.append(f"image{seed}.png")
        _image(width, height, seed).save(tmp_path / names[-1])
    stock = _run_stock(folder, tmp_path, names, tmp_path / "stock.pt")
    assert stock["type"] == "LlavaNextProcessor"
    assert stock["pinpoints"] == config["image_grid_pinpoints"]

    reloaded = load_pretrained_model(folder, device="cpu")
    assert reloaded.kind is LLAVA_NEXT
    tiling = AnyresTiling.for_tower(PINPOINTS, source.image_processor, patch_size=14)
    image_token = source.model.config.image_token_id
    for name, result in zip(names, stock["results"]):
        image = Image.open(tmp_path / name)
        # Our counts and tiles are the stock processor's; our models give the stock model's logits.
        assert int((result["input_ids"] == image_token).sum()) == tiling.image_tokens(image), name
        ours = tiling.pixel_values([image], source.image_processor)
        torch.testing.assert_close(ours["pixel_values"], result["pixel_values"], atol=1e-6, rtol=0)
        assert ours["image_sizes"].tolist() == result["image_sizes"].tolist()
        inputs = {k: result[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
        for model in (source.model.eval(), reloaded.model):
            with torch.no_grad():
                logits = model(**inputs).logits
            assert (logits - result["logits"]).abs().max() < 1e-4, name
        generated = reloaded.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert generated.tolist() == result["generated"].tolist(), name


STOCK_WRITER = r"""
import sys, torch
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor)
llm, out = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(llm)
tokenizer.add_tokens(["<image>"], special_tokens=True)
vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14)
text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
pinpoints = [[56, 112], [112, 56], [112, 112]]
config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
torch.manual_seed(1)
LlavaNextForConditionalGeneration(config).save_pretrained(out)
image_processor = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                          image_grid_pinpoints=pinpoints)
LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(out)
"""


def test_a_stock_llava_next_folder_loads_as_the_llava_next_kind(tmp_path, tiny_parts):
    folder = str(tmp_path / "stock")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", STOCK_WRITER, tiny_parts["llm"], folder], capture_output=True,
                          text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert resolve_kind(folder) is LLAVA_NEXT
    loaded = load_pretrained_model(folder, device="cpu")
    assert isinstance(loaded.model, LlavaTinyNextForCausalLM)
    assert loaded.model.config.image_grid_pinpoints == [[56, 112], [112, 56], [112, 112]]
    assert type(loaded.processor).__name__ == "LlavaNextProcessor"
    image = _image(100, 30, 3)
    inputs = loaded.processor(text="USER: <image>\nWhat is it? ASSISTANT:", images=image, return_tensors="pt")
    from transformers import LlavaNextForConditionalGeneration  # the same weights read by stock transformers

    stock = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, stock(**inputs).logits, atol=1e-5, rtol=0)
    weights = dict(stock.named_parameters())
    torch.testing.assert_close(loaded.model.model.image_newline, weights["model.image_newline"])


def test_image_newline_starts_as_llava_next_initialises_it(tiny_parts):
    torch.manual_seed(0)
    loaded = with_anyres(assemble_model(tiny_parts["llm"], tiny_parts["clip"]), "[[56, 112], [112, 56]]")
    newline = loaded.model.model.image_newline
    hidden = loaded.model.config.text_config.hidden_size
    assert newline.shape == (hidden,) and newline.requires_grad
    assert 0.5 / hidden ** 0.5 < newline.std().item() < 2 / hidden ** 0.5
    assert not [n for n, p in loaded.model.named_parameters() if p.device.type == "meta"]
    base = assemble_model(tiny_parts["llm"], tiny_parts["clip"])  # the parts moved over, not re-initialised
    torch.testing.assert_close(loaded.model.model.language_model.embed_tokens.weight,
                               base.model.model.language_model.embed_tokens.weight)
    assert loaded.model.get_input_embeddings() is loaded.model.model.language_model.embed_tokens


def test_text_only_training_batches_run_the_tower_on_a_blank_image(anyres_source):
    model = anyres_source.model.train()
    model.zero_grad()
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    model(input_ids=ids, labels=ids).loss.backward()
    # Every trainable part took part in the graph (DDP/ZeRO reduce every gradient), the blank image adding nothing.
    for name in ("model.image_newline", "model.multi_modal_projector.linear_1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and not grad.any(), name
    blank = model(input_ids=ids).logits.detach()  # training, with grad: the blank image runs, scattered nowhere
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, blank)  # no tower run at inference


def test_a_wrong_placeholder_count_names_the_anyres_count(anyres_source):
    image = _image(150, 40, 0)
    inputs = anyres_source.processor(text="USER: <image>\nWhat? ASSISTANT:", images=image, return_tensors="pt")
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # still the placeholders, one token less in front
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    with torch.no_grad():
        anyres_source.model.eval()(**inputs)  # placeholders unchanged: runs
    image_token = anyres_source.model.config.image_token_id
    first = int((inputs["input_ids"][0] == image_token).nonzero()[0])
    inputs["input_ids"] = torch.cat([inputs["input_ids"][:, :first], inputs["input_ids"][:, first + 1:]], dim=1)
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match="anyres_num_image_tokens"), torch.no_grad():
        anyres_source.model(**inputs)
