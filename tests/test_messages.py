"""One reader turns messages into turns + images (`llava_tiny.messages`): a content part type registered
in that one place is read by training-data loading and by the API alike (docs/extending.md counts it)."""
import base64
import io
import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from llava_tiny import messages
from llava_tiny.conversation import prepare_tokenizer, tokenize_sample
from llava_tiny.data import load_samples
from llava_tiny.templates import turn_text
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER
from llava_tiny.train.dataset import LazySupervisedDataset


@pytest.fixture
def quote_part(monkeypatch):
    """A throwaway content part, {"type": "quote", "quote": "..."}, registered as any new one would be."""
    monkeypatch.setattr(messages, "PART_READERS", dict(messages.PART_READERS))

    @messages.part_reader("quote")
    def read_quote(part):
        return messages.Piece(text=f"Quote: {part['quote']}") if isinstance(part.get("quote"), str) else None


def test_where_image_markers_go():
    # Data records: in place, as written; requests: one marker per image first, typed markers dropped.
    assert turn_text(["What color?", None], images_inline=False) == "What color?<image>"
    assert turn_text(" as <image> written ", images_inline=False) == " as <image> written "
    assert turn_text([None, " A ", "<image>B", None], images_inline=True) == "<image>\n<image>\nA\nB"


def test_a_registered_part_reads_in_training_data(tmp_path, quote_part):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "0.png")
    record = {"id": "q", "images": ["0.png"], "messages": [
        {"role": "user", "content": [{"type": "quote", "quote": "red"}, {"type": "text", "text": " Color?"},
                                     {"type": "image"}]},
        {"role": "assistant", "content": "Red."}]}
    llava = {"id": "q", "image": "0.png", "conversations": [{"from": "human", "value": "Quote: red Color?<image>"},
                                                            {"from": "gpt", "value": "Red."}]}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [sample] = load_samples(str(path))
    assert sample["conversations"] == llava["conversations"]
    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    prepare_tokenizer(tok, "vicuna_v1")
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    item = LazySupervisedDataset(str(path), tok, processor, "vicuna_v1", 3, image_folder=str(tmp_path))[0]
    assert item["input_ids"].tolist() == tokenize_sample(llava, tok, "vicuna_v1", 3).input_ids
    # An unregistered type is still refused, naming the message.
    path.write_text(json.dumps({**record, "messages": [{"role": "user", "content": [{"type": "poem"}]}]}) + "\n")
    from llava_tiny.checks import check_samples
    assert "message 0 has content" in str(check_samples(load_samples(str(path)), file=str(path),
                                                        image_folder=str(tmp_path), images=None).errors[0])


def test_a_registered_part_reads_in_the_api(model_dir, quote_part):
    from fastapi.testclient import TestClient

    from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch
    from llava_tiny.model.builder import load_pretrained_model
    from llava_tiny.serve import api
    from llava_tiny.serve.engine import Engine
    from llava_tiny.serve.served import ServedModel

    loaded = load_pretrained_model(model_dir, device="cpu")
    image = Image.new("RGB", (40, 30), (20, 40, 220))
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    engine = Engine(ServedModel.resolve(loaded))
    try:
        with TestClient(api.create_app(engine, "m")) as client:
            body = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 4, "temperature": 0, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "quote", "quote": "blue"}, {"type": "text", "text": "Color?"}]}]})
    finally:
        engine.close()
    assert body.status_code == 200, body.text
    prompt = build_prompt(loaded, "<image>\nQuote: blue\nColor?", [image])
    assert body.json()["usage"]["prompt_tokens"] == len(prompt.input_ids)
    with torch.no_grad():
        expected = generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=4))[0]
    assert body.json()["choices"][0]["message"]["content"] == expected
