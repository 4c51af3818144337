"""llava_tiny.testing.tiny --tokenizer-from: a from-scratch tokenizer that knows the dataset's own words."""
import json

from transformers import AutoTokenizer

from llava_tiny.testing.tiny import main

CAPTION = "Pullover with long sleeves folded beside an Ankle boot on grey cloth"


def test_tokenizer_from_data_knows_its_words(tmp_path):
    samples = [{"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich garment is this?"}, {"from": "gpt", "value": answer}]}
        for i, answer in enumerate(["Pullover", "Ankle boot", "Sneaker", CAPTION])]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    assert main(["--out", str(tmp_path / "plain"), "--hidden", "16", "--vision-hidden", "16"]) == 0
    assert main(["--out", str(tmp_path / "mine"), "--hidden", "16", "--vision-hidden", "16",
                 "--tokenizer-from", str(data)]) == 0
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain" / "llm")
    mine = AutoTokenizer.from_pretrained(tmp_path / "mine" / "llm")
    assert len(plain("Pullover", add_special_tokens=False).input_ids) >= 4  # letters and fragments
    assert len(mine("Pullover", add_special_tokens=False).input_ids) == 1
    assert all(len(mine(word, add_special_tokens=False).input_ids) == 1 for word in CAPTION.split())
    assert len(mine(CAPTION, add_special_tokens=False).input_ids) <= len(CAPTION.split())
    assert len(plain(CAPTION, add_special_tokens=False).input_ids) > 2 * len(CAPTION.split())
    assert mine.decode(mine(CAPTION, add_special_tokens=False).input_ids) == CAPTION
