"""Generated ids to text (`llava_tiny.decoding`): a cut at max_new_tokens never leaves half a character, with
the exact TinyLlama tokenizer (byte fallback: `<0xE7>` tokens) and a byte-level BPE (GPT-2/Qwen style); the
default max_new_tokens from the longest training answer; generate_batch decodes through the same function."""
import os
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llava_tiny import inference
from llava_tiny.decoding import answer_room, complete_ids, decode_answer, longest_answer_tokens, unfinished_bytes

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llama2-tokenizer")
ANSWERS = ["a cat 猫 sits 🐱", "貓咪", "🐱🐶 two pets", "naïve café — ok", "图中有什么", "cat🐱 s"]


def _byte_level_bpe():
    """A byte-level BPE whose merges put text and the first byte of a character in one token ("catð" is
    "cat" + the 0xF0 that begins 🐱), and the rest of the character in another."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(["<s>", "</s>", *sorted(alphabet)])}
    merges = [("c", "a"), ("ca", "t"), ("cat", "ð"), ("Ł", "Ĳ"), ("ŁĲ", "±"), ("Ġ", "s")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module", params=["tinyllama", "byte_level"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER) if request.param == "tinyllama" else _byte_level_bpe()


def test_the_fixture_really_splits_characters_into_byte_tokens():
    tok = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    ids = tok.encode("貓咪", add_special_tokens=False)
    assert "<0xE5>" in tok.convert_ids_to_tokens(ids)
    # the failure being fixed: half of 咪 after a whole 貓 turns the whole byte run into U+FFFD
    assert tok.decode(ids[:-1]) == "\ufffd" * 5


@pytest.mark.parametrize("answer", ANSWERS)
def test_every_cut_decodes_to_whole_characters_only(tokenizer, answer):
    ids = tokenizer.encode(answer, add_special_tokens=False)
    full = decode_answer(tokenizer, ids)
    assert full == answer.strip()
    previous = ""
    for cut in range(len(ids) + 1):
        text = decode_answer(tokenizer, ids[:cut])
        assert "\ufffd" not in text, (answer, cut, text)
        assert full.startswith(text), (answer, cut, text)  # the answer so far, never other characters
        assert len(text) >= len(previous.rstrip()) - 1  # nothing said before is taken back (a space may be stripped)
        previous = text
        plain = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
        if "\ufffd" not in plain:
            assert text == plain  # a cut between characters decodes as before


def test_tinyllama_cut_drops_exactly_the_bytes_of_the_unfinished_character():
    tok = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    ids = tok.encode("a cat 猫 sits 🐱", add_special_tokens=False)
    # 🐱 is 4 byte tokens at the end: cut after 1, 2, 3 of them
    for left in (1, 2, 3):
        kept, unfinished = complete_ids(tok, ids[:len(ids) - 4 + left])
        assert kept == ids[:len(ids) - 4] and unfinished == 0
    assert decode_answer(tok, ids[:-1]) == "a cat 猫 sits"


def test_byte_level_text_before_a_cut_character_in_the_same_token_is_kept():
    tok = _byte_level_bpe()
    ids = tok.encode("cat🐱 s", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["catð", "ŁĲ±"]
    assert tok.decode(ids[:1]) == "cat\ufffd"
    assert complete_ids(tok, ids[:1]) == (ids[:1], 1)
    assert decode_answer(tok, ids[:1]) == "cat"


def test_an_invalid_byte_the_model_made_is_kept_as_it_is():
    tok = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    stray = tok.convert_tokens_to_ids(["<0x80>"])  # a continuation byte with no start: not a cut character
    ids = tok.encode("ok", add_special_tokens=False) + stray
    assert complete_ids(tok, ids) == (ids, 0)
    assert decode_answer(tok, ids) == tok.decode(ids).strip()


@pytest.mark.parametrize("data, expected", [(b"", 0), (b"abc", 0), ("猫".encode(), 0), ("猫".encode()[:1], 1),
                                            ("猫".encode()[:2], 2), ("🐱".encode()[:3], 3), (b"a\x80", 0),
                                            (b"\x80\x80\x80\x80\x80", 0), ("é".encode()[:1], 1)])
def test_unfinished_bytes(data, expected):
    assert unfinished_bytes(data) == expected


def test_default_max_new_tokens_is_the_longest_training_answer_plus_room():
    tok = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    samples = [
        {"id": "a", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                      {"from": "gpt", "value": "a long caption about two red squares 猫"},
                                      {"from": "human", "value": "And?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "c", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a b c d e f g h i j k"}]},
    ]
    longest = max(len(tok.encode(a, add_special_tokens=False))
                  for a in ("red", "a long caption about two red squares 猫", "yes", "a b c d e f g h i j k"))
    assert longest_answer_tokens(tok, samples) == longest
    assert answer_room(longest) == longest + 1 + 4  # the stop token and a margin of 4
    assert longest_answer_tokens(tok, [{"id": "x", "conversations": []}]) == 0


def test_generate_batch_decodes_through_the_same_function(monkeypatch):
    tok = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    ids = tok.encode("貓咪", add_special_tokens=False)
    monkeypatch.setattr(inference, "generate_ids", lambda *args, **kwargs: [ids[:-1], ids + [tok.eos_token_id, 0]])
    loaded = SimpleNamespace(tokenizer=tok, template="tinyllama")
    assert inference.generate_batch(loaded, [inference.Prompt([1]), inference.Prompt([1])]) == ["貓", "貓咪"]


def test_the_demo_helper_prints_the_default_from_a_training_split(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "train.json"
    data.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "<image>\\nWhat?"}, '
                    '{"from": "gpt", "value": "a red square and a blue circle"}]}]')
    tok = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    expected = answer_room(len(tok.encode("a red square and a blue circle", add_special_tokens=False)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "scripts/lib/max_new_tokens.py", "--model-path", FIXTURE_TOKENIZER,
                          "--data", str(data)], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == str(expected), run.stderr
    data.write_text("[]")
    run = subprocess.run([sys.executable, "scripts/lib/max_new_tokens.py", "--model-path", FIXTURE_TOKENIZER,
                          "--data", str(data)], cwd=root, capture_output=True, text=True)
    assert run.returncode == 2 and "no assistant answer" in run.stderr
