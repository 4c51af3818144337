"""Label masks: supervised tokens are exactly the assistant answers + end-of-turn, for every template."""
import pytest
from transformers import AutoTokenizer

from llava_tiny.conversation import (IGNORE_INDEX, IMAGE_TOKEN, TEMPLATES, ConversationError, chat_template_jinja,
                                     get_template, prepare_tokenizer, tokenize_conversation, tokenize_prompt)
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER

CONVERSATIONS = [
    [("<image>\nWhat color is the square?", "red")],
    [("  <image>\nHow many objects?  ", "  3 objects. "), ("And the shape?", "A circle, mostly round.")],
    [("<image>\nDescribe it.", "Ünïcödé answer: 1,000 cats ñ 日本"),
     ("Numbers 12 and 3.5?", "12 + 3.5 = 15.5"),
     ("Last?", "yes")],
]


def _conversation(pairs):
    turns = []
    for q, a in pairs:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


@pytest.fixture(scope="module", params=["llama2", "small"])
def tokenizer_dir(request, tiny_parts):
    return LLAMA2_TOKENIZER if request.param == "llama2" else tiny_parts["llm"]


def _tokenizer(path, template):
    tok = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tok, template)
    return tok


def _supervised_spans(labels):
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("pairs", CONVERSATIONS, ids=["1turn", "2turns", "3turns-unicode"])
def test_supervised_tokens_are_exactly_the_answers(tokenizer_dir, template, pairs):
    tok = _tokenizer(tokenizer_dir, template)
    eot = get_template(template).end_of_turn_token(tok)
    if template == "plain" and len(pairs) > 1:
        with pytest.raises(ConversationError, match="takes one \\(image, caption\\) turn"):
            tokenize_conversation(_conversation(pairs), tok, template, num_image_tokens=5, num_images=1)
        return
    out = tokenize_conversation(_conversation(pairs), tok, template, num_image_tokens=5, num_images=1, sample_id="s1")
    assert len(out.input_ids) == len(out.labels)
    spans = _supervised_spans(out.labels)
    assert len(spans) == len(pairs)
    for span, (_, answer) in zip(spans, pairs):
        assert tok.decode(span).lstrip(" ") == answer.strip() + eot
    # Supervised labels equal the input ids at the same positions; nothing else is supervised.
    for i, label in enumerate(out.labels):
        assert label == IGNORE_INDEX or label == out.input_ids[i]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert out.input_ids.count(image_id) == 5
    assert all(label == IGNORE_INDEX for i, label in zip(out.input_ids, out.labels) if i == image_id)


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "tinyllama", "llama_3", "llava_llama_3", "chatml"])
def test_processor_chat_template_tokenizes_like_training(template):
    tok = _tokenizer(LLAMA2_TOKENIZER, template)
    history = [("<image>\nWhat color is the square?", "Red, 3 items.")]
    ours = tokenize_prompt("And the shape?", tok, template, num_image_tokens=1, history=history)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]},
                {"role": "assistant", "content": "Red, 3 items."},
                {"role": "user", "content": "And the shape?"}]
    text = tok.apply_chat_template(messages, chat_template=chat_template_jinja(template), tokenize=False)
    assert tok(text, add_special_tokens=get_template(template).bos).input_ids == ours


def test_llama2_fixture_is_exact():
    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    assert tok("Hello world").input_ids == [1, 15043, 3186]


@pytest.mark.parametrize("conversation, num_images, message", [
    ([{"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "a"}], 1, "2 <image> marker(s) but 1 image"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], 1, "1 image(s) but 0 <image> marker"),
    ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "   "}], 1, "turn 1 (assistant) is empty"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], 0, "turn 0 is from 'gpt'; expected 'human'"),
    ([{"from": "human", "value": "q"}], 0, "expected human/gpt pairs"),
])
def test_bad_samples_are_named(tiny_parts, conversation, num_images, message):
    tok = _tokenizer(tiny_parts["llm"], "llava_v1")
    with pytest.raises(ConversationError) as err:
        tokenize_conversation(conversation, tok, "llava_v1", num_image_tokens=4, num_images=num_images,
                              sample_id="rs-00042")
    assert "rs-00042" in str(err.value) and message in str(err.value)


def test_truncation_drops_whole_turns_never_the_image(tiny_parts):
    tok = _tokenizer(tiny_parts["llm"], "llava_v1")
    conv = _conversation([("<image>\nWhat color?", "red"), ("And the shape of it?", "a circle " * 20)])
    full = tokenize_conversation(conv, tok, "llava_v1", num_image_tokens=50, num_images=1)
    first = tokenize_conversation(conv[:2], tok, "llava_v1", num_image_tokens=50, num_images=1)
    cut = tokenize_conversation(conv, tok, "llava_v1", num_image_tokens=50, num_images=1,
                                model_max_length=len(full.input_ids) - 1)
    assert cut.dropped_turns == 1
    assert cut.input_ids == first.input_ids and cut.labels == first.labels
    with pytest.raises(ConversationError, match="sample 'x1'.*cannot be shortened without cutting the image"):
        tokenize_conversation(conv, tok, "llava_v1", num_image_tokens=50, num_images=1,
                              model_max_length=40, sample_id="x1")


def test_text_only_sample_and_unknown_template(tiny_parts):
    tok = _tokenizer(tiny_parts["llm"], "llava_v1")
    out = tokenize_conversation(_conversation([("Hello?", "Hi.")]), tok, "v1", num_images=0)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) not in out.input_ids and out.num_supervised > 0
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna_v9'"):
        get_template("vicuna_v9")
