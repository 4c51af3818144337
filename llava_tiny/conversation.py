"""The one place where a conversation becomes `input_ids` + `labels` (and a prompt its ids).

A template (`templates.py`, or the tokenizer's own with `auto`: `auto_template.py`) renders a
conversation as a list of text chunks, each marked supervised or not. Each chunk is tokenized on
its own and the ids are concatenated, so the labels are *built* from the answer chunks and never
derived by subtracting lengths (the cause of LLaVA's "tokenization mismatch" warnings that
silently zero a sample's labels). A single `<image>` in a user turn moves to the turn's start, as
LLaVA's `preprocess_multimodal` does (`templates.place_image_marker`).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .auto_template import AUTO_TEMPLATE, AutoTemplate, default_template, wrapped_chat_template
from .data import record_format, sample_images
from .templates import (AUTO, IMAGE_TOKEN, TEMPLATES, ChatTemplate, TemplateError,  # noqa: F401 (re-exported)
                        named_template, named_template_jinja, place_image_marker)

IGNORE_INDEX = -100


class ConversationError(ValueError):
    """A sample that cannot be turned into a training example; the message names the sample."""


class SampleTooLongError(ConversationError):
    """Not even the first turn fits `model_max_length` (the image placeholders or the answer would be cut)."""


def get_template(name: str | None, tokenizer=None) -> ChatTemplate | AutoTemplate:
    """The chat template called `name`: a hand-written one (LLaVA's `--version` names accepted) or `auto`.

    With no name (no `--version`), `tokenizer` decides and the choice is logged: its own chat template
    when it has one that renders text turns, else `llava_v1` (`auto_template.default_template`).
    """
    if name is None:
        if tokenizer is None:
            raise ValueError("get_template(None) needs the tokenizer to choose the default template")
        name = default_template(tokenizer)
    return AUTO_TEMPLATE if name == AUTO else named_template(name)


def _template(template):
    return get_template(template) if isinstance(template, str) else template


def chat_template_jinja(template: str | ChatTemplate | AutoTemplate, tokenizer=None) -> str:
    """The Jinja chat template for `LlavaProcessor` / `apply_chat_template` that renders what training renders.

    For `auto` it is the tokenizer's own template behind a step that turns image parts into `<image>`
    markers (so `tokenizer` is needed); for the others, `templates.named_template_jinja`.
    """
    template = _template(template)
    if isinstance(template, AutoTemplate):
        if tokenizer is None:
            raise ValueError("chat_template_jinja('auto') needs the tokenizer whose chat template it wraps")
        return wrapped_chat_template(tokenizer)
    return named_template_jinja(template)


def prepare_tokenizer(tokenizer, template: str | ChatTemplate, image_token: bool = True) -> int:
    """Add `<image>` (unless `image_token` is False: a text-only model), the template's special tokens and a
    pad token; return how many were added.

    The model's embeddings must then have `len(tokenizer)` rows (see `model.assembly`).
    """
    template = _template(template)
    wanted = [IMAGE_TOKEN, *template.special_tokens] if image_token else list(template.special_tokens)
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    added = tokenizer.add_special_tokens({"additional_special_tokens": missing}) if missing else 0
    if tokenizer.pad_token is None:
        # LLaVA's choice for Llama: pad with <unk>, never with eos (eos is supervised).
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return added


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    # Trailing (user, assistant) pairs dropped to fit model_max_length (a `text` record: 1 when it is cut).
    dropped_turns: int = 0

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


ROLES = ("human", "gpt")


def turn_problems(conversations) -> list[tuple[str, str]]:
    """(kind, message) for each way `conversations` breaks LLaVA's turn rules; [] when it keeps them.

    The rules: a non-empty list of {from, value} turns, roles alternating human/gpt from human and
    ending with gpt, no empty turn, `<image>` only in human turns. The one definition of these
    rules: training raises on the first (`conversation_turns`), `llava_tiny.checks` lists them all.
    """
    if not isinstance(conversations, list) or not conversations:
        return [("bad_conversations", "'conversations' is missing or empty; expected a non-empty list of "
                                      "{from, value} turns (or OpenAI-style 'messages', or a formatted 'text')")]
    problems = []
    for i, turn in enumerate(conversations):
        expected = ROLES[i % 2]
        if not isinstance(turn, dict):
            problems.append(("bad_conversations", f"turn {i} is a {type(turn).__name__}; expected an object with "
                                                  "'from' and 'value'"))
            continue
        if turn.get("from") != expected:
            problems.append(("bad_roles", f"turn {i} is from {turn.get('from')!r}; expected {expected!r} "
                                          "(roles alternate human/gpt, user/assistant in 'messages', starting with human)"))
        value = turn.get("value")
        role = "assistant" if expected == "gpt" else "human"
        if not isinstance(value, str) or not value.strip():
            problems.append(("empty_turn", f"turn {i} ({role}) is empty; expected text"))
        elif expected == "gpt" and IMAGE_TOKEN in value:
            problems.append(("image_in_answer", f"turn {i} (assistant) contains {IMAGE_TOKEN}; expected markers "
                                                "in human turns only"))
    if len(conversations) % 2:
        problems.append(("bad_roles", f"{len(conversations)} turns end with a human turn; expected human/gpt pairs "
                                      "ending with a gpt answer"))
    return problems


def marker_problem(num_markers: int, num_images: int) -> str | None:
    """What is wrong when `num_markers` `<image>` markers meet `num_images` images: one marker per image."""
    if num_markers == num_images:
        return None
    if num_markers < num_images:
        return f"{num_images} image(s) but {num_markers} {IMAGE_TOKEN} marker(s); expected one marker per image"
    return f"{num_markers} {IMAGE_TOKEN} marker(s) but {num_images} image(s); expected one image per marker"


def conversation_turns(conversations: list[dict], sample_id=None) -> list[tuple[str, str]]:
    """Check LLaVA `conversations` (`turn_problems`) and pair them up as (human, gpt) texts."""
    problems = turn_problems(conversations)
    if problems:
        raise ConversationError(f"sample {sample_id!r}: {problems[0][1]}")
    return [(conversations[i]["value"].strip(), conversations[i + 1]["value"].strip())
            for i in range(0, len(conversations), 2)]


def checked_turns(conversations: list[dict], template: ChatTemplate | AutoTemplate, num_images: int | None,
                  sample_id=None) -> list[tuple[str, str]]:
    """The (question, answer) turns, checked against the template and the sample's `num_images`."""
    turns = conversation_turns(conversations, sample_id)
    if template.image_only_prompt and len(turns) != 1:
        raise ConversationError(f"sample {sample_id!r}: template {template.name!r} takes one (image, caption) turn; "
                                f"found {len(turns)} turns")
    markers = sum(user.count(IMAGE_TOKEN) for user, _ in turns)
    mismatch = marker_problem(markers, num_images) if num_images is not None else None
    if mismatch:
        raise ConversationError(f"sample {sample_id!r}: {mismatch}")
    return turns


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _encode_in_context(tokenizer, text: str, context: str) -> list[int]:
    """Ids of `text` as they appear right after `context` in one string.

    Sentencepiece tokenizers add a word-start marker to a string's first word, so a chunk
    encoded alone can differ from the same chunk inside the prompt; encoding it behind its
    context keeps training ids equal to what a whole-string tokenizer (the processor) produces.
    """
    if not context:
        return _encode(tokenizer, text)
    ctx = _encode(tokenizer, context)
    both = _encode(tokenizer, context + text)
    if both[: len(ctx)] == ctx:
        return both[len(ctx):]
    return _encode(tokenizer, text)  # a token spans the boundary: fall back to the chunk alone


ImageTokens = int | Sequence[int]  # placeholders per `<image>`: one count for all, or one per image in order (anyres)


def _image_counts(num_image_tokens: ImageTokens) -> Iterator[int]:
    """The placeholder count of each successive `<image>` marker."""
    if isinstance(num_image_tokens, int):
        return itertools.repeat(num_image_tokens)
    return iter(num_image_tokens)


def _placeholders(num_image_tokens: ImageTokens, markers: int) -> int:
    """How many placeholders `markers` images take in all."""
    return markers * num_image_tokens if isinstance(num_image_tokens, int) else sum(num_image_tokens)


def _encode_chunk(tokenizer, text: str, context: str, image_token_id: int, counts: Iterator[int]) -> list[int]:
    """Tokenize one chunk, expanding each `<image>` into the next of `counts` placeholders."""
    ids: list[int] = []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            count = next(counts, None)
            if count is None:
                raise ConversationError(f"more {IMAGE_TOKEN} markers than images to count placeholders for")
            ids.extend([image_token_id] * count)
            context = IMAGE_TOKEN
        if piece:
            ids.extend(_encode_in_context(tokenizer, piece, context))
    return ids


def _image_token_id(tokenizer) -> int:
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; call prepare_tokenizer(tokenizer, template) first")
    return image_token_id


def _encode_turns(turns, tokenizer, template, num_image_tokens: ImageTokens, system: str | None = None):
    image_token_id = _image_token_id(tokenizer) if num_image_tokens else None  # text-only models have none
    counts = _image_counts(num_image_tokens)
    input_ids = [tokenizer.bos_token_id] if template.bos and tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(input_ids)
    context = tokenizer.bos_token if input_ids else ""
    turns = [(place_image_marker(user), answer) for user, answer in turns]
    chunks = template.render_chunks(turns, tokenizer, system)
    # Where each turn pair ends (after its last supervised chunk), so truncation can drop whole trailing turns.
    turn_ends = []
    for i, (text, supervised) in enumerate(chunks):
        ids = _encode_chunk(tokenizer, text, context, image_token_id, counts)
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))
        if supervised and (i + 1 == len(chunks) or not chunks[i + 1][1]):
            turn_ends.append(len(input_ids))
        context = text
    return input_ids, labels, turn_ends


def _fit(input_ids: list[int], labels: list[int], ends: list[int], model_max_length: int | None, sample_id,
         needed: str) -> TokenizedConversation:
    """Cut the ids at the last of `ends` that fits `model_max_length`; `needed` says what the first end holds."""
    if model_max_length is None or len(input_ids) <= model_max_length:
        return TokenizedConversation(input_ids=input_ids, labels=labels)
    fitting = [end for end in ends if end <= model_max_length]
    if not fitting:
        raise SampleTooLongError(f"sample {sample_id!r}: {needed} but model_max_length is {model_max_length}; it "
                                 "cannot be shortened without cutting the image or the answer")
    cut = fitting[-1]
    return TokenizedConversation(input_ids[:cut], labels[:cut], dropped_turns=len(ends) - len(fitting))


def tokenize_conversation(conversations: list[dict], tokenizer, template: str | ChatTemplate = "llava_v1",
                          num_image_tokens: ImageTokens = 576, num_images: int | None = None,
                          model_max_length: int | None = None, sample_id=None,
                          system: str | None = None) -> TokenizedConversation:
    """Turn LLaVA `conversations` into `input_ids` and `labels` for training.

    Labels are -100 everywhere except the assistant answers and their end-of-turn token. Each
    `<image>` becomes exactly `num_image_tokens` placeholder ids (or, a list, its own count per image in
    order: anyres, `llava_tiny.anyres.anyres_num_image_tokens`). If `num_images` is given, the
    number of `<image>` markers must equal it. `system` (a sample's own system message) replaces the
    template's system prompt. When the conversation is longer than `model_max_length`, whole
    trailing turns are dropped; a first turn that cannot fit (it holds the image placeholders)
    raises `ConversationError` naming the sample.
    """
    template = _template(template)
    turns = checked_turns(conversations, template, num_images, sample_id)
    markers = sum(user.count(IMAGE_TOKEN) for user, _ in turns)
    try:
        input_ids, labels, turn_ends = _encode_turns(turns, tokenizer, template, num_image_tokens, system)
    except TemplateError as err:  # a template problem, not the sample's: it stops the run (never skipped)
        raise TemplateError(f"sample {sample_id!r}: {err}") from None
    needed = (f"the first turn needs {turn_ends[0]} tokens ({_placeholders(num_image_tokens, markers)} of them image "
              "placeholders)" if turn_ends else "")
    return _fit(input_ids, labels, turn_ends, model_max_length, sample_id, needed)


def _leading_special_ids(tokenizer) -> list[int]:
    """What the tokenizer puts before any text (BOS, or nothing)."""
    with_special, plain = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    start = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
    return with_special[:start]


def tokenize_text(text: str, tokenizer, num_image_tokens: ImageTokens = 576, num_images: int | None = None,
                  model_max_length: int | None = None, sample_id=None) -> TokenizedConversation:
    """A record with only a formatted `text` (SFTTrainer's `dataset_text_field`): every token supervised.

    The tokenizer's special tokens are added as for any text (BOS), EOS is appended unless the text
    ends with it (as TRL does), and `<image>` markers become placeholders (never supervised). Longer
    than `model_max_length`: cut there, unless that would cut into the image placeholders.
    """
    markers = text.count(IMAGE_TOKEN)
    mismatch = marker_problem(markers, num_images) if num_images is not None else None
    if mismatch:
        raise ConversationError(f"sample {sample_id!r}: {mismatch}")
    if tokenizer.eos_token and not text.rstrip().endswith(tokenizer.eos_token):
        text = text + tokenizer.eos_token
    image_token_id = _image_token_id(tokenizer) if num_image_tokens else None  # text-only models have none
    bos = _leading_special_ids(tokenizer)
    input_ids = bos + _encode_chunk(tokenizer, text, tokenizer.bos_token if bos else "", image_token_id,
                                    _image_counts(num_image_tokens))
    labels = [IGNORE_INDEX if i < len(bos) or token == image_token_id else token for i, token in enumerate(input_ids)]
    if model_max_length is None or len(input_ids) <= model_max_length:
        return TokenizedConversation(input_ids, labels)
    images_end = max((i + 1 for i, token in enumerate(input_ids) if token == image_token_id), default=0)
    if images_end >= model_max_length:
        raise SampleTooLongError(f"sample {sample_id!r}: the text needs {len(input_ids)} tokens and its image "
                                 f"placeholders end at token {images_end}, but model_max_length is "
                                 f"{model_max_length}; it cannot be cut without cutting the image")
    return TokenizedConversation(input_ids[:model_max_length], labels[:model_max_length], dropped_turns=1)


def tokenize_sample(sample: dict, tokenizer, template: str | ChatTemplate, num_image_tokens: ImageTokens,
                    model_max_length: int | None = None, sample_id=None) -> TokenizedConversation:
    """A record as `data.load_samples` gives it, tokenized as training does: its conversation with its own
    system message (`tokenize_conversation`), or its formatted `text` (`tokenize_text`)."""
    num_images = len(sample_images(sample))
    if record_format(sample) == "text":
        return tokenize_text(sample.get("text"), tokenizer, num_image_tokens, num_images, model_max_length, sample_id)
    return tokenize_conversation(sample.get("conversations"), tokenizer, template, num_image_tokens, num_images,
                                 model_max_length, sample_id, system=sample.get("system"))


def tokenize_prompt(question: str, tokenizer, template: str | ChatTemplate = "llava_v1",
                    num_image_tokens: ImageTokens = 576, history: list[tuple[str, str]] = (),
                    system: str | None = None) -> list[int]:
    """Token ids of a generation prompt: `system` (or the template's), earlier (question, answer) turns, then
    `question`.

    Built by the same chunks as training, so the model sees at inference what it saw in training.
    """
    turns = [*history, (question.strip(), None)]
    ids, _, _ = _encode_turns(turns, tokenizer, _template(template), num_image_tokens, system)
    return ids


def stop_token_ids(tokenizer, template: str | ChatTemplate) -> list[int]:
    """Ids that end an assistant turn for this template (for `generate(eos_token_id=...)`)."""
    end_text = _template(template).end_of_turn_token(tokenizer)
    ids = {tokenizer.eos_token_id}
    end = tokenizer(end_text, add_special_tokens=False).input_ids
    if len(end) == 1:
        ids.add(end[0])
    elif end_text == "\n":
        ids.add(end[-1])  # sentencepiece encodes "\n" as ["▁", "<0x0A>"]
    return sorted(i for i in ids if i is not None)
