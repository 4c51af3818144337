"""The cheap bound of a first turn's tokens (`llava_tiny.token_bounds`) against the tokenizers themselves, the
oracles: the exact Llama-2/TinyLlama tokenizer (SentencePiece BPE, byte fallback), the small test tokenizer,
and a byte-level BPE built with the `tokenizers` library (GPT-2/Llama-3/Qwen style), on arbitrary Unicode.
And the check before training names the same unusable samples with the bound as with tokenizing them all."""
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llava_tiny.checks import check_length
from llava_tiny.conversation import _encode, _encode_in_context, prepare_tokenizer, tokenize_sample
from llava_tiny.token_bounds import first_turn_upper_bound, token_counter

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llama2-tokenizer")
CORPUS = ["What color is the square?", "A red circle next to a blue triangle.", "¿Qué ves? 图中有什么 — émoji 🙂",
          "Answer the question using a single word or phrase."]


def _byte_level_bpe():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module", params=["llama2", "small", "byte_level"])
def tokenizer(request, tiny_parts):
    tok = {"llama2": lambda: AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER),
           "small": lambda: AutoTokenizer.from_pretrained(tiny_parts["llm"]), "byte_level": _byte_level_bpe}[request.param]()
    prepare_tokenizer(tok, "v1")
    return tok


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60) | \
    st.sampled_from(CORPUS + ["  double  spaces ", "\n\nnew\nlines", "e\u0301 combining", "▁literal▁markers▁"])


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=TEXT)
def test_the_plain_normaliser_is_the_tokenizers_own(tokenizer, text):
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        assert token_counter(tokenizer).normalise(text) == backend.normalizer.normalize_str(text)


def test_the_llama_normaliser_runs_as_python(tokenizer):
    if tokenizer.backend_tokenizer.normalizer is not None and "Prepend" in str(tokenizer.backend_tokenizer.normalizer):
        assert token_counter(tokenizer).normalise.__name__ == "normalise"  # not the tokenizer's (slow) own


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=TEXT, context=TEXT)
def test_a_chunk_never_takes_more_ids_than_its_bound(tokenizer, text, context):
    count = token_counter(tokenizer)
    assert len(_encode(tokenizer, text)) <= count(text)
    assert len(_encode_in_context(tokenizer, text, context)) <= count(text)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(question=TEXT, answer=TEXT, later=TEXT, template=st.sampled_from(["v1", "llava_v1", "plain", "chatml", "tinyllama"]))
def test_a_first_turn_never_takes_more_tokens_than_its_bound(tokenizer, question, answer, later, template):
    if not question.strip() or not answer.strip() or "<image>" in question + answer + later:
        return
    turns = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]
    if template != "plain" and later.strip():
        turns += [{"from": "human", "value": later}, {"from": "gpt", "value": later}]
    sample = {"image": "a.png", "conversations": turns}
    full = tokenize_sample(sample, tokenizer, template, 5)
    first_turn = next(i for i in range(len(full.labels)) if full.labels[i] != -100 and
                      (i + 1 == len(full.labels) or full.labels[i + 1] == -100)) + 1
    assert first_turn <= first_turn_upper_bound(sample, tokenizer, template, 5)


def test_the_check_before_training_names_the_same_samples_with_the_bound(tiny_parts):
    """Every sample the bound clears is one exact tokenizing clears; the unusable ones are named either way."""
    tok = AutoTokenizer.from_pretrained(tiny_parts["llm"])
    prepare_tokenizer(tok, "v1")
    words = "red green blue square circle".split()
    samples = []
    for i in range(60):  # first turns from short to far past the limit, later turns that truncation drops
        answer = " ".join(words[j % 5] for j in range(i * 3))
        samples.append({"id": f"s{i}", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer or "x"},
            {"from": "human", "value": "More?"}, {"from": "gpt", "value": answer * 3 or "y"}]})
    samples.append({"id": "bad", "image": "a.png", "conversations": [{"from": "human", "value": "What?"}]})
    exact = {s["id"]: check_length(s, s["id"], tok, "v1", 16, 128).problem for s in samples}
    bound = {s["id"]: check_length(s, s["id"], tok, "v1", 16, 128, measure=False).problem for s in samples}
    assert bound == exact
    assert sum(p is not None and p[0] == "too_long" for p in exact.values()) >= 10
    assert exact["bad"][0] == "bad_conversations"
