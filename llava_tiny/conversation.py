"""Chat templates and the one place where a conversation becomes `input_ids` + `labels`.

A template renders a conversation as a list of text chunks, each marked supervised or not. Each
chunk is tokenized on its own and the ids are concatenated, so the labels are *built* from the
answer chunks and never derived by subtracting lengths (the cause of LLaVA's "tokenization
mismatch" warnings that silently zero a sample's labels).

Add a template: write one `ChatTemplate(...)` entry in `TEMPLATES` below.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


class ConversationError(ValueError):
    """A sample that cannot be turned into a training example; the message names the sample."""


class SampleTooLongError(ConversationError):
    """Not even the first turn fits `model_max_length` (the image placeholders or the answer would be cut)."""


@dataclass(frozen=True)
class ChatTemplate:
    """How one chat format renders turns.

    `user` / `assistant_prefix` are format strings with `{message}` (user only); the assistant's
    answer is followed by `end_of_turn` (a token string, supervised) and then `after_turn`
    (unsupervised glue before the next user turn). `bos` says whether the tokenizer's BOS starts
    the sequence.
    """

    name: str
    system: str = ""
    user: str = "{message}"
    assistant_prefix: str = ""
    answer_sep: str = ""  # text between the assistant prefix and the answer (vicuna's " ")
    end_of_turn: str = "</s>"  # "" means the tokenizer's eos token
    after_turn: str = ""
    bos: bool = True
    # Tokens this format needs that a base vocabulary may lack (added by `prepare_tokenizer`).
    special_tokens: tuple[str, ...] = field(default=())
    # `plain` (stage-1 captioning) drops the human text and keeps only the image.
    image_only_prompt: bool = False

    def end_of_turn_token(self, tokenizer) -> str:
        return self.end_of_turn or tokenizer.eos_token

    def render_chunks(self, turns: list[tuple[str, str | None]], tokenizer) -> list[tuple[str, bool]]:
        """Render (user, assistant) pairs as (text, supervised) chunks.

        An assistant message of None ends the list with the generation prompt (for inference).
        """
        chunks: list[tuple[str, bool]] = []
        prefix = self.system
        for user, answer in turns:
            if self.image_only_prompt:
                user = IMAGE_TOKEN * user.count(IMAGE_TOKEN)
            chunks.append((prefix + self.user.format(message=user) + self.assistant_prefix, False))
            if answer is None:
                break
            chunks.append((self.answer_sep + answer, True))
            chunks.append((self.end_of_turn_token(tokenizer), True))
            prefix = self.after_turn
        return chunks


_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        # LLaVA stage 1: "<image>" + caption + "\n".
        ChatTemplate(name="plain", end_of_turn="\n", image_only_prompt=True),
        # LLaVA-1.5 (conv_vicuna_v1): "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
        ChatTemplate(name="llava_v1", system=_LLAVA_SYSTEM + " ", user="USER: {message} ",
                     assistant_prefix="ASSISTANT:", answer_sep=" ", end_of_turn=""),
        # TinyLlama-1.1B-Chat (Zephyr style): "<|user|>\nq</s>\n<|assistant|>\na</s>\n"
        ChatTemplate(name="tinyllama", user="<|user|>\n{message}", assistant_prefix="</s>\n<|assistant|>\n",
                     end_of_turn="", after_turn="\n"),
        ChatTemplate(name="llama_3", user="<|start_header_id|>user<|end_header_id|>\n\n{message}",
                     assistant_prefix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                     end_of_turn="<|eot_id|>", bos=True,
                     special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
        # Qwen2 chat (ChatML).
        ChatTemplate(name="chatml", system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                     user="<|im_start|>user\n{message}", assistant_prefix="<|im_end|>\n<|im_start|>assistant\n",
                     end_of_turn="<|im_end|>", after_turn="\n", bos=False,
                     special_tokens=("<|im_start|>", "<|im_end|>")),
    ]
}
# LLaVA's names for the same formats.
TEMPLATE_ALIASES = {"v1": "llava_v1", "vicuna_v1": "llava_v1", "llava_llama_3": "llama_3", "qwen_2": "chatml",
                    "qwen2": "chatml"}


def get_template(name: str) -> ChatTemplate:
    """Return the chat template called `name` (LLaVA's `--version` names are accepted)."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in TEMPLATES:
        known = sorted(set(TEMPLATES) | set(TEMPLATE_ALIASES))
        raise ValueError(f"unknown conversation template {name!r}; expected one of {known}")
    return TEMPLATES[key]


def prepare_tokenizer(tokenizer, template: str | ChatTemplate) -> int:
    """Add `<image>`, the template's special tokens and a pad token; return how many were added.

    The model's embeddings must then have `len(tokenizer)` rows (see `model.builder`).
    """
    template = get_template(template) if isinstance(template, str) else template
    wanted = [IMAGE_TOKEN, *template.special_tokens]
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
    dropped_turns: int = 0  # trailing (user, assistant) pairs dropped to fit model_max_length

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
                                      "{from, value} turns")]
    problems = []
    for i, turn in enumerate(conversations):
        expected = ROLES[i % 2]
        if not isinstance(turn, dict):
            problems.append(("bad_conversations", f"turn {i} is a {type(turn).__name__}; expected an object with "
                                                  "'from' and 'value'"))
            continue
        if turn.get("from") != expected:
            problems.append(("bad_roles", f"turn {i} is from {turn.get('from')!r}; expected {expected!r} "
                                          "(roles alternate human/gpt, starting with human)"))
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


def _encode_chunk(tokenizer, text: str, context: str, image_token_id: int, num_image_tokens: int) -> list[int]:
    """Tokenize one chunk, expanding each `<image>` into `num_image_tokens` placeholders."""
    ids: list[int] = []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.extend([image_token_id] * num_image_tokens)
            context = IMAGE_TOKEN
        if piece:
            ids.extend(_encode_in_context(tokenizer, piece, context))
    return ids


def _encode_turns(turns, tokenizer, template: ChatTemplate, num_image_tokens: int):
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; call prepare_tokenizer(tokenizer, template) first")
    input_ids = [tokenizer.bos_token_id] if template.bos and tokenizer.bos_token_id is not None else []
    labels = [IGNORE_INDEX] * len(input_ids)
    context = tokenizer.bos_token if input_ids else ""
    # Where each turn pair ends, so truncation can drop whole trailing turns.
    turn_ends = []
    eot = template.end_of_turn_token(tokenizer)
    for text, supervised in template.render_chunks(turns, tokenizer):
        ids = _encode_chunk(tokenizer, text, context, image_token_id, num_image_tokens)
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))
        if supervised and text == eot:
            turn_ends.append(len(input_ids))
        context = text
    return input_ids, labels, turn_ends


def tokenize_conversation(conversations: list[dict], tokenizer, template: str | ChatTemplate = "llava_v1",
                          num_image_tokens: int = 576, num_images: int | None = None,
                          model_max_length: int | None = None, sample_id=None) -> TokenizedConversation:
    """Turn LLaVA `conversations` into `input_ids` and `labels` for training.

    Labels are -100 everywhere except the assistant answers and their end-of-turn token. Each
    `<image>` becomes exactly `num_image_tokens` placeholder ids. If `num_images` is given, the
    number of `<image>` markers must equal it. When the conversation is longer than
    `model_max_length`, whole trailing turns are dropped; a first turn that cannot fit (it holds
    the image placeholders) raises `ConversationError` naming the sample.
    """
    template = get_template(template) if isinstance(template, str) else template
    turns = conversation_turns(conversations, sample_id)
    if template.image_only_prompt and len(turns) != 1:
        raise ConversationError(f"sample {sample_id!r}: template {template.name!r} takes one (image, caption) turn; "
                                f"found {len(turns)} turns")
    markers = sum(user.count(IMAGE_TOKEN) for user, _ in turns)
    mismatch = marker_problem(markers, num_images) if num_images is not None else None
    if mismatch:
        raise ConversationError(f"sample {sample_id!r}: {mismatch}")
    input_ids, labels, turn_ends = _encode_turns(turns, tokenizer, template, num_image_tokens)
    dropped = 0
    if model_max_length is not None and len(input_ids) > model_max_length:
        fitting = [end for end in turn_ends if end <= model_max_length]
        if not fitting:
            raise SampleTooLongError(
                f"sample {sample_id!r}: the first turn needs {turn_ends[0]} tokens "
                f"({markers * num_image_tokens} of them image placeholders) but model_max_length is "
                f"{model_max_length}; it cannot be shortened without cutting the image or the answer")
        cut = fitting[-1]
        dropped = len(turn_ends) - len(fitting)
        input_ids, labels = input_ids[:cut], labels[:cut]
    return TokenizedConversation(input_ids=input_ids, labels=labels, dropped_turns=dropped)


def tokenize_prompt(question: str, tokenizer, template: str | ChatTemplate = "llava_v1",
                    num_image_tokens: int = 576, history: list[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a generation prompt: earlier (question, answer) turns, then `question`.

    Built by the same chunks as training, so the model sees at inference what it saw in training.
    """
    template = get_template(template) if isinstance(template, str) else template
    turns = [*history, (question.strip(), None)]
    ids, _, _ = _encode_turns(turns, tokenizer, template, num_image_tokens)
    return ids


def stop_token_ids(tokenizer, template: str | ChatTemplate) -> list[int]:
    """Ids that end an assistant turn for this template (for `generate(eos_token_id=...)`)."""
    template = get_template(template) if isinstance(template, str) else template
    ids = {tokenizer.eos_token_id}
    end = tokenizer(template.end_of_turn_token(tokenizer), add_special_tokens=False).input_ids
    if len(end) == 1:
        ids.add(end[0])
    elif template.end_of_turn == "\n":
        ids.add(end[-1])  # sentencepiece encodes "\n" as ["▁", "<0x0A>"]
    return sorted(i for i in ids if i is not None)


def chat_template_jinja(template: str | ChatTemplate) -> str:
    """A Jinja chat template rendering the same text, for `LlavaProcessor` / `apply_chat_template`.

    Messages use transformers' format: content is a string or a list of {"type": "text"|"image"}.
    """
    t = get_template(template) if isinstance(template, str) else template

    def lit(s: str) -> str:
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    text_part = "" if t.image_only_prompt else "{% set ns.text = ns.text + c['text'] %}"
    content = ("{% if message['content'] is string %}{% set ns.text = message['content'] %}{% else %}"
               "{% set ns.text = '' %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
               f"{{% set ns.text = ns.text + {lit(IMAGE_TOKEN + chr(10))} %}}"
               f"{{% elif c['type'] == 'text' %}}{text_part}{{% endif %}}{{% endfor %}}"
               "{% endif %}{% set text = ns.text | trim %}")
    user_pre, user_post = t.user.split("{message}")
    end = lit(t.end_of_turn) if t.end_of_turn else "eos_token"
    # No BOS here: the processor's tokenizer adds it, as for stock llava-hf checkpoints.
    return (
        f"{{% set ns = namespace(prefix={lit(t.system)}, text='') %}}"
        + "{% for message in messages %}" + content
        + "{% if message['role'] == 'user' %}"
        + f"{{{{ ns.prefix + {lit(user_pre)} + text + {lit(user_post)} + {lit(t.assistant_prefix)} }}}}"
        + "{% elif message['role'] == 'assistant' %}"
        + f"{{{{ {lit(t.answer_sep)} + text + {end} }}}}{{% set ns.prefix = {lit(t.after_turn)} %}}"
        + "{% endif %}{% endfor %}"
    )
