"""`--version auto`: the tokenizer's own Jinja chat template, labels from rendering growing prefixes.

The official templates are set on the exact Llama-2 fixture tokenizer here (their special tokens
added), so the test needs no hub: on the official Llama-3 and ChatML templates `auto` must give
exactly the ids and labels of the hand-written `llama_3` / `chatml`.
"""
import logging

import pytest
from transformers import AutoTokenizer

from llava_tiny.checks import check_length
from llava_tiny.conversation import (IGNORE_INDEX, TemplateError, chat_template_jinja, get_template,
                                     prepare_tokenizer, stop_token_ids, tokenize_conversation, tokenize_prompt)
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json
LLAMA_3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
           "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' "
           "%}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen/Qwen2-7B-Instruct (ChatML)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# microsoft/Phi-3-mini-4k-instruct: an eos only at the very end of a conversation
PHI_3 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
         "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
         "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}")
# google/gemma-2b-it: no system role
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] "
         "| trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# Rewrites history: the first line counts the messages.
COUNTING = ("{{ messages | length }} messages\n{% for message in messages %}{{ message['role'] + ': ' + "
            "message['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
# Vision-model style: content must be a list of parts (a string renders nothing).
PARTS_ONLY = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for c in message['content'] %}"
              "{% if c is mapping and c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

PAIRS = [[("<image>\nWhat color is the square?", "Red.")],
         [("What is it?\n<image>", "A cat, mostly grey."), ("Sure?", "Yes."), ("Last?", "Ünïcödé 日本 12.5")]]


def _conversation(pairs):
    return [{"from": who, "value": text} for q, a in pairs for who, text in (("human", q), ("gpt", a))]


def _tokenizer(chat_template=None, extra=()):
    tok = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    for name in ("llama_3", "chatml"):
        prepare_tokenizer(tok, name)
    tok.add_special_tokens({"additional_special_tokens": list(extra)})
    tok.chat_template = chat_template
    return tok


def _spans(labels):
    spans, current = [], []
    for label in [*labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans, current = spans + [current], []
    return spans


@pytest.mark.parametrize("official, named", [(LLAMA_3, "llama_3"), (CHATML, "chatml")])
@pytest.mark.parametrize("pairs", PAIRS, ids=["1turn", "3turns"])
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_auto_equals_the_hand_written_template(official, named, pairs, system):
    tok = _tokenizer(official)
    auto = tokenize_conversation(_conversation(pairs), tok, "auto", 4, num_images=1, system=system)
    hand = tokenize_conversation(_conversation(pairs), tok, named, 4, num_images=1, system=system)
    assert auto.input_ids == hand.input_ids
    assert auto.labels == hand.labels
    history, question = pairs[:-1], pairs[-1][0]
    assert tokenize_prompt(question, tok, "auto", 4, history, system) == tokenize_prompt(question, tok, named, 4,
                                                                                          history, system)
    assert stop_token_ids(tok, "auto") == stop_token_ids(tok, named)


@pytest.mark.parametrize("template, end, extra", [
    (PHI_3, "<|end|>", ("<|user|>", "<|assistant|>", "<|end|>")),
    (GEMMA, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>")),
])
def test_auto_supervises_each_answer_and_its_end_of_turn(template, end, extra):
    tok = _tokenizer(template, extra)
    pairs = PAIRS[1]
    out = tokenize_conversation(_conversation(pairs), tok, "auto", 4, num_images=1)
    spans = _spans(out.labels)
    assert [tok.decode(span) for span in spans] == [tok.decode(tok(a + end, add_special_tokens=False).input_ids)
                                                    for _, a in pairs]
    # What was trained is what the template renders (Phi-3's final eos aside: it ends a conversation, not a turn).
    rendered = tok.apply_chat_template([{"role": r, "content": t} for q, a in pairs
                                        for r, t in (("user", q.replace("What is it?\n<image>", "<image>\nWhat is it?")),
                                                     ("assistant", a))], tokenize=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    expected = tok(rendered, add_special_tokens=False).input_ids
    expected = [t for i in expected for t in ([image_id] * 4 if i == image_id else [i])]
    assert expected[:len(out.input_ids)] == out.input_ids
    assert len(expected) - len(out.input_ids) <= 2  # Phi-3's trailing "\n</s>" is not part of the last turn
    assert stop_token_ids(tok, "auto") == sorted({tok.eos_token_id, tok.convert_tokens_to_ids(end)})


def test_a_template_that_rewrites_history_is_refused():
    tok = _tokenizer(COUNTING)
    with pytest.raises(TemplateError, match="sample 'x7'.*rewrites earlier turns.*'1 messages.*became '2 messages.*pass --version"):
        tokenize_conversation(_conversation(PAIRS[0]), tok, "auto", 4, num_images=1, sample_id="x7")
    # Not a bad sample to skip: the run's template is wrong, so the length check lets it through.
    with pytest.raises(TemplateError):
        check_length({"conversations": _conversation(PAIRS[1]), "image": "a.png"}, "x8", tok, "auto", 4)


def test_templates_auto_cannot_use_are_refused_clearly():
    with pytest.raises(TemplateError, match="has no chat template"):
        tokenize_conversation(_conversation(PAIRS[0]), _tokenizer(None), "auto", 4, num_images=1)
    with pytest.raises(TemplateError, match="does not write a user message given as a string"):
        tokenize_conversation(_conversation(PAIRS[0]), _tokenizer(PARTS_ONLY), "auto", 4, num_images=1)
    gemma = _tokenizer(GEMMA, ("<start_of_turn>", "<end_of_turn>"))
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenize_conversation(_conversation(PAIRS[0]), gemma, "auto", 4, num_images=1, system="Be brief.")


def test_default_template_is_the_models_own_when_it_has_one(caplog):
    with caplog.at_level(logging.INFO, logger="llava_tiny.auto_template"):
        assert get_template(None, _tokenizer(LLAMA_3)).name == "auto"
        assert get_template(None, _tokenizer(None)).name == "llava_v1"
        assert get_template(None, _tokenizer(PARTS_ONLY)).name == "llava_v1"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[0].startswith("conversation template: auto")
    assert "no chat template" in lines[1] and "does not write a user message" in lines[2]


def test_processor_template_for_auto_wraps_the_models_own():
    tok = _tokenizer(LLAMA_3)
    jinja = chat_template_jinja("auto", tok)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What color?"}, {"type": "image"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the shape?"}]
    text = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
    ours = tokenize_prompt("And the shape?", tok, "auto", 1, history=[("What color?\n<image>", "Red.")])
    assert tok(text, add_special_tokens=False).input_ids == ours
    tok.chat_template = jinja  # saved with the processor and loaded back: not wrapped twice
    assert chat_template_jinja("auto", tok) == jinja
    with pytest.raises(ValueError, match="needs the tokenizer"):
        chat_template_jinja("auto")
