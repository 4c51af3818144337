"""An upper bound of the tokens a sample's first turn takes, without tokenizing it, for the check before
training.

Tokenizing every record to find the few that cannot be used was most of a run's start-up (about 10
tokenizer calls per record: 665k records took minutes, on every rank). A sample is refused as too
long only when its first turn (the image placeholders, the first question and answer) cannot fit
`model_max_length`: later turns are dropped by truncation, which is no error. And every token of a
fast (Rust) tokenizer covers at least one byte of the normalised text (BPE and Unigram pieces,
byte-level and byte-fallback tokens alike), plus at most one word-start marker per call. So the
UTF-8 length of the first turn's normalised text, with a margin per chunk, bounds its ids: a sample
whose bound fits is not tokenized; the few near the limit are (`checks.check_length`).
`tests/test_token_bounds.py` holds the bound against the tokenizers themselves (the oracles).
"""
from __future__ import annotations

import json
import weakref

from .conversation import IMAGE_TOKEN, TemplateError, checked_turns, get_template, place_image_marker
from .data import record_format, sample_images

# Ids one encode call may add beyond one per byte: a word-start marker, and one more for a normaliser that
# composes characters across the boundary of a chunk and its context.
_MARGIN = 2
_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per tokenizer (reading its spec costs)


class _TokenCounter:
    """The most ids a text can take under one fast tokenizer: one per UTF-8 byte of its normalised text, but
    one per word-start marker "▁" of a SentencePiece-style tokenizer (3 bytes, and a token of its own, so never
    split into byte tokens; a byte-level tokenizer would split one in the text into 3), plus `_MARGIN`."""

    def __init__(self, backend, vocabulary):
        spec = json.loads(backend.to_str())
        self.normalise = str if backend.normalizer is None else (
            _plain_normaliser(spec.get("normalizer")) or backend.normalizer.normalize_str)
        byte_level = "ByteLevel" in json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
        self.marker = "▁" if not byte_level and "▁" in vocabulary else None

    def __call__(self, text: str) -> int:
        normalised = self.normalise(text)
        markers = normalised.count(self.marker) if self.marker else 0
        return len(normalised.encode("utf-8")) - 2 * markers + _MARGIN


def _plain_normaliser(spec: dict | None):
    """The normaliser as Python string operations when it is only `Prepend` and plain-string `Replace` steps
    (Llama-2, TinyLlama, Mistral): its result, without the alignments the tokenizer's own keeps (10-100x
    slower on a long answer); None for any other normaliser (the tokenizer's own is used)."""
    steps = spec.get("normalizers") if spec and spec.get("type") == "Sequence" else [spec]
    ops = []
    for step in steps or []:
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Prepend" and isinstance(step.get("prepend"), str):
            ops.append((step["prepend"], None, None))
        elif kind == "Replace" and list(step.get("pattern", {})) == ["String"] and step["pattern"]["String"]:
            ops.append((None, step["pattern"]["String"], step.get("content", "")))
        else:
            return None

    def normalise(text: str) -> str:
        for prepend, old, new in ops:
            text = (prepend + text if text else text) if prepend is not None else text.replace(old, new)
        return text
    return normalise if ops else None


def token_counter(tokenizer) -> _TokenCounter | None:
    """The bound of `tokenizer` (None for a slow tokenizer: no cheap bound)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    if tokenizer not in _COUNTERS:
        _COUNTERS[tokenizer] = _TokenCounter(backend, tokenizer.get_vocab())
    return _COUNTERS[tokenizer]


def first_turn_upper_bound(sample: dict, tokenizer, template, num_image_tokens: int, sample_id=None) -> int | None:
    """At least as many tokens as `conversation.tokenize_sample` gives `sample` up to the end of its first
    answer, or None when there is no cheap bound (a slow tokenizer, a formatted `text` record: tokenize it).
    Raises `ConversationError` for a conversation that tokenizing refuses, as `tokenize_sample` does."""
    count = token_counter(tokenizer)
    if count is None or record_format(sample) == "text":
        return None
    template = get_template(template) if isinstance(template, str) else template
    turns = checked_turns(sample.get("conversations"), template, len(sample_images(sample)), sample_id)
    try:
        chunks = template.render_chunks([(place_image_marker(user), answer) for user, answer in turns], tokenizer,
                                        sample.get("system"))
    except TemplateError as err:  # a template problem, not the sample's: it stops the run (never skipped)
        raise TemplateError(f"sample {sample_id!r}: {err}") from None
    bound, answered = 1, False  # BOS
    for text, supervised in chunks:
        if answered and not supervised:
            break  # the first answer ended (`conversation._encode_turns`' first turn end)
        answered = answered or supervised
        pieces = text.split(IMAGE_TOKEN)
        bound += (len(pieces) - 1) * num_image_tokens + sum(count(piece) for piece in pieces if piece)
    return bound
