"""The hand-written templates against LLaVA's own (haotian-liu/LLaVA and LLaVA-NeXT `llava/conversation.py`):
the same prompt strings, the same ids, the same place for `<image>`; a sample's system message."""
import pytest
from transformers import AutoTokenizer

from llava_tiny.conversation import (IGNORE_INDEX, IMAGE_TOKEN, chat_template_jinja, prepare_tokenizer,
                                     tokenize_conversation, tokenize_prompt)
from llava_tiny.templates import place_image_marker
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER

# Copied from haotian-liu/LLaVA llava/conversation.py (conv_vicuna_v1, conv_llava_v1) and LLaVA-NeXT
# (conv_llava_llama_3), not from this project, so a drift in ours fails here.
CONV_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CONV_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CONV_LLAVA_LLAMA_3 = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                      "that the user provides, and assist the user with a variety of tasks using natural language.")
TURNS = [("What is shown?", "A red square."), ("And its size?", "Small, about 3 cm.")]


def _llava_two_style(system, turns):
    """LLaVA's `Conversation.get_prompt()` for SeparatorStyle.TWO (sep " ", sep2 "</s>", roles USER/ASSISTANT)."""
    seps, text = [" ", "</s>"], system + " "
    for i, message in enumerate(m for turn in turns for m in turn):
        text += ("USER", "ASSISTANT")[i % 2] + ": " + message + seps[i % 2]
    return text


def _conversation(turns):
    return [{"from": who, "value": text} for q, a in turns for who, text in (("human", q), ("gpt", a))]


@pytest.fixture(scope="module")
def tok():
    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    for name in ("llama_3", "chatml"):
        prepare_tokenizer(tokenizer, name)
    return tokenizer


@pytest.mark.parametrize("version, system", [("v1", CONV_VICUNA_V1), ("vicuna_v1", CONV_VICUNA_V1),
                                             ("llava_v1", CONV_LLAVA_V1)])
def test_v1_templates_are_llavas_strings_and_ids(tok, version, system):
    expected = _llava_two_style(system, TURNS)
    messages = [{"role": r, "content": t} for q, a in TURNS for r, t in (("user", q), ("assistant", a))]
    assert tok.apply_chat_template(messages, chat_template=chat_template_jinja(version), tokenize=False) == expected
    # LLaVA tokenizes its whole prompt string (BOS added): the ids must be the same.
    out = tokenize_conversation(_conversation(TURNS), tok, version, num_images=0)
    assert out.input_ids == tok(expected).input_ids
    answers = [tok.decode([t for t in out.labels if t != IGNORE_INDEX])]
    assert answers == [tok.decode(tok("A red square.</s>Small, about 3 cm.</s>", add_special_tokens=False).input_ids)]


def test_llava_llama_3_has_llava_nexts_system_prompt(tok):
    ids = tokenize_prompt("Hi", tok, "llava_llama_3", num_image_tokens=1)
    text = tok.decode(ids)
    assert CONV_LLAVA_LLAMA_3 in text and "system" in text
    assert CONV_LLAVA_LLAMA_3 not in tok.decode(tokenize_prompt("Hi", tok, "llama_3", num_image_tokens=1))


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "tinyllama", "llama_3", "chatml", "plain"])
def test_question_then_image_trains_like_image_then_question(tok, template):
    """LLaVA-665k writes "question\\n<image>"; LLaVA's preprocess_multimodal moves it: "<image>\\nquestion"."""
    after = tokenize_conversation(_conversation([("What color?\n<image>", "Red.")]), tok, template, 3, num_images=1)
    before = tokenize_conversation(_conversation([("<image>\nWhat color?", "Red.")]), tok, template, 3, num_images=1)
    assert after.input_ids == before.input_ids and after.labels == before.labels
    assert tokenize_prompt("What color?\n<image>", tok, template, 3) == tokenize_prompt("<image>\nWhat color?", tok,
                                                                                       template, 3)


def test_several_markers_keep_their_places():
    assert place_image_marker("left <image> right <image>") == "left <image> right <image>"
    assert place_image_marker("  q\n<image>  ") == "<image>\nq"
    assert place_image_marker(IMAGE_TOKEN) == IMAGE_TOKEN  # LLaVA strips the lone "<image>\n" too
    assert place_image_marker("no image") == "no image"
    assert place_image_marker("What <image> color?") == "<image>\nWhat  color?"  # LLaVA keeps both spaces


@pytest.mark.parametrize("template", ["vicuna_v1", "tinyllama", "llama_3", "chatml"])
def test_a_samples_system_message_replaces_the_templates(tok, template):
    conv = _conversation([("<image>\nWhat color?", "Red.")])
    own = tokenize_conversation(conv, tok, template, 2, num_images=1, system="Answer in one word.")
    text = tok.decode(own.input_ids)
    assert "Answer in one word." in text
    assert "curious" not in text and "You are a helpful assistant." not in text
    assert tok.decode([t for t in own.labels if t != IGNORE_INDEX]).startswith("Red.")
    # The processor's template takes a first system message the same way.
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "What color?"}, {"type": "image"}]}]
    rendered = tok.apply_chat_template(messages, chat_template=chat_template_jinja(template), tokenize=False)
    prompt = tokenize_prompt("What color?\n<image>", tok, template, 1, system="Answer in one word.")
    assert tok(rendered, add_special_tokens=template != "chatml").input_ids == prompt
