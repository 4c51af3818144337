"""The table of chat templates (`--version`), and the Jinja chat template each one gives the processor.

A template renders a conversation as text chunks, each marked supervised or not; `conversation.py`
tokenizes the chunks (the one renderer for training labels, inference prompts and, through
`chat_template_jinja`, the processor's chat template). `auto` renders with the tokenizer's own
Jinja template instead (`auto_template.py`).

Add a template: write one `ChatTemplate(...)` entry in `TEMPLATES` below.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_TOKEN = "<image>"


class TemplateError(ValueError):
    """A chat template that cannot render a conversation into labelled chunks; the message says why."""


def place_image_marker(text: str) -> str:
    """A user turn as LLaVA trains it: a single `<image>` moves to the start of the turn, followed by "\\n".

    This is `preprocess_multimodal` of haotian-liu/LLaVA, so "question\\n<image>" and "<image>\\nquestion"
    give the same ids. Several markers in one turn keep their places (LLaVA would merge them into one).
    """
    if text.count(IMAGE_TOKEN) != 1:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def turn_text(content: str | list[str | None], images_inline: bool) -> str:
    """A message's content (a string, or its parts read as texts and None for each image) as one turn's
    text with an `<image>` marker per image.

    Data records (images listed apart, `images_inline` False): a string is the turn as written,
    markers included; parts keep their order, each image as `<image>` + "\\n" where it stands, as
    transformers' chat templates render them (`message_text_jinja` is the processor's copy of this rule).
    Requests (each image in its own part: the API, the web chat, the CLI): one marker per image first,
    then the texts, each stripped, one per line; a marker typed in a request's text is removed, since
    only an image part asks for one. Either way `place_image_marker` then moves a turn's single marker
    to the front, as LLaVA trains.
    """
    marker = IMAGE_TOKEN + "\n"
    if not images_inline:
        if isinstance(content, str):
            return content
        return "".join(marker if piece is None else piece for piece in content).strip()
    pieces = [content] if isinstance(content, str) else content
    texts = [piece.replace(IMAGE_TOKEN, "").strip() for piece in pieces if piece is not None]
    return marker * pieces.count(None) + "\n".join(text for text in texts if text)


@dataclass(frozen=True)
class ChatTemplate:
    """How one chat format renders turns.

    `system` is the default system prompt and `system_format` the markup around it ("{system}" marks
    where it goes; "" means the format has no system prompt). `user` / `assistant_prefix` are format
    strings with `{message}` (user only); the assistant's answer is followed by `end_of_turn` (a token
    string, supervised) and then `after_turn` (unsupervised glue before the next user turn). `bos`
    says whether the tokenizer's BOS starts the sequence.
    """

    name: str
    system: str = ""
    system_format: str = "{system}"
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
        """The text that ends an assistant turn (supervised, and a stop string at inference)."""
        return self.end_of_turn or tokenizer.eos_token

    def system_block(self, system: str | None = None) -> str:
        """The rendered system prompt: `system` (a sample's own) or the default, in this format's markup."""
        text = self.system if system is None else system.strip()
        return self.system_format.replace("{system}", text) if text and self.system_format else ""

    def render_chunks(self, turns: list[tuple[str, str | None]], tokenizer,
                      system: str | None = None) -> list[tuple[str, bool]]:
        """Render (user, assistant) pairs as (text, supervised) chunks.

        An assistant message of None ends the list with the generation prompt (for inference).
        """
        chunks: list[tuple[str, bool]] = []
        prefix = self.system_block(system)
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


# LLaVA's system prompts, word for word (haotian-liu/LLaVA and LLaVA-VL/LLaVA-NeXT `llava/conversation.py`).
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")

_LLAMA_3 = dict(user="<|start_header_id|>user<|end_header_id|>\n\n{message}",
                system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                assistant_prefix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                end_of_turn="<|eot_id|>", bos=True,
                special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
# SeparatorStyle.TWO of LLaVA: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
_VICUNA = dict(system_format="{system} ", user="USER: {message} ", assistant_prefix="ASSISTANT:", answer_sep=" ",
               end_of_turn="")

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        # LLaVA stage 1: "<image>" + caption + "\n".
        ChatTemplate(name="plain", system_format="", end_of_turn="\n", image_only_prompt=True),
        ChatTemplate(name="vicuna_v1", system=VICUNA_V1_SYSTEM, **_VICUNA),  # conv_vicuna_v1 (LLaVA-1.5's `v1`)
        ChatTemplate(name="llava_v1", system=LLAVA_V1_SYSTEM, **_VICUNA),  # conv_llava_v1
        # TinyLlama-1.1B-Chat (Zephyr style): "<|user|>\nq</s>\n<|assistant|>\na</s>\n"
        ChatTemplate(name="tinyllama", system_format="<|system|>\n{system}</s>\n", user="<|user|>\n{message}",
                     assistant_prefix="</s>\n<|assistant|>\n", end_of_turn="", after_turn="\n"),
        ChatTemplate(name="llama_3", **_LLAMA_3),
        ChatTemplate(name="llava_llama_3", system=LLAVA_LLAMA_3_SYSTEM, **_LLAMA_3),  # LLaVA-NeXT's conv_llava_llama_3
        # Qwen2 chat (ChatML).
        ChatTemplate(name="chatml", system="You are a helpful assistant.",
                     system_format="<|im_start|>system\n{system}<|im_end|>\n",
                     user="<|im_start|>user\n{message}", assistant_prefix="<|im_end|>\n<|im_start|>assistant\n",
                     end_of_turn="<|im_end|>", after_turn="\n", bos=False,
                     special_tokens=("<|im_start|>", "<|im_end|>")),
    ]
}
# LLaVA's names for the same formats: `v1` is conv_vicuna_v1 there (LLaVA-1.5 trains with `--version v1`).
TEMPLATE_ALIASES = {"v1": "vicuna_v1", "qwen_2": "chatml", "qwen2": "chatml"}
AUTO = "auto"  # the tokenizer's own chat template (`auto_template.AutoTemplate`)


def template_names() -> list[str]:
    """Every name `--version` accepts."""
    return sorted({*TEMPLATES, *TEMPLATE_ALIASES, AUTO})


def named_template(name: str) -> ChatTemplate:
    """The hand-written template called `name` (LLaVA's `--version` names are accepted)."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; expected one of {template_names()}")
    return TEMPLATES[key]


def template_name_problems(flag: str, name: str | None) -> list[str]:
    """[] when `name` is not given or names a template; else the problem, naming `flag` (`--version`, `--conv-mode`)."""
    if name is None or name == AUTO:
        return []
    try:
        named_template(name)
    except ValueError as err:
        return [f"{flag}: {err}"]
    return []


def _lit(s: str) -> str:
    """`s` as a Jinja string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def message_text_jinja(image_only: bool = False) -> str:
    """Jinja that sets `text` to `message`'s content as one string with `<image>` markers, placed as
    `turn_text` places a data record's (a string as is, each image part a marker where it stands) and
    then `place_image_marker` (the processor's copy of those two rules)."""
    text_part = "" if image_only else "{% set ns.text = ns.text + c['text'] %}"
    marker = _lit(IMAGE_TOKEN)
    return ("{% if message['content'] is string %}{% set ns.text = message['content'] %}{% else %}"
            "{% set ns.text = '' %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
            f"{{% set ns.text = ns.text + {_lit(IMAGE_TOKEN + chr(10))} %}}"
            f"{{% elif c['type'] == 'text' %}}{text_part}{{% endif %}}{{% endfor %}}"
            "{% endif %}{% set text = ns.text | trim %}"
            f"{{% if message['role'] == 'user' and text.count({marker}) == 1 %}}"
            f"{{% set text = ({_lit(IMAGE_TOKEN + chr(10))} + (text.replace({marker}, '') | trim)) | trim %}}"
            "{% endif %}")


def named_template_jinja(t: ChatTemplate) -> str:
    """A Jinja chat template rendering the same text as `t`, for `LlavaProcessor` / `apply_chat_template`.

    Messages use transformers' format: content is a string or a list of {"type": "text"|"image"}; a
    first `system` message replaces the template's system prompt.
    """
    user_pre, user_post = t.user.split("{message}")
    sys_pre, _, sys_post = t.system_format.partition("{system}")
    end = _lit(t.end_of_turn) if t.end_of_turn else "eos_token"
    system = ("{% if messages and messages[0]['role'] == 'system' %}{% set message = messages[0] %}"
              + message_text_jinja() + (f"{{% set ns.prefix = {_lit(sys_pre)} + text + {_lit(sys_post)} "
                                        "if text else '' %}" if t.system_format else "{% set ns.prefix = '' %}")
              + "{% endif %}")
    # No BOS here: the processor's tokenizer adds it, as for stock llava-hf checkpoints.
    return (
        f"{{% set ns = namespace(prefix={_lit(t.system_block())}, text='') %}}" + system
        + "{% for message in messages %}" + message_text_jinja(t.image_only_prompt)
        + "{% if message['role'] == 'user' %}"
        + f"{{{{ ns.prefix + {_lit(user_pre)} + text + {_lit(user_post)} + {_lit(t.assistant_prefix)} }}}}"
        + "{% elif message['role'] == 'assistant' %}"
        + f"{{{{ {_lit(t.answer_sep)} + text + {end} }}}}{{% set ns.prefix = {_lit(t.after_turn)} %}}"
        + "{% endif %}{% endfor %}"
    )
