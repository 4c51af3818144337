"""Reading data files: one reader for training, evaluation and the data tools (SFT conversations and
preference pairs).

A record's format is told from its fields (`record_format`), and `normalise_record` turns every SFT
record into the one internal form that training, `eval.generate` and the data tools read:

    LLaVA         {"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt", "value"}]}
                  a leading {"from": "system"} turn becomes `system`
    messages      {"messages": [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text",
                  "text"}, {"type": "image"}]}], "images": [paths]} (OpenAI, TRL, LLaMA-Factory) -> the
                  LLaVA form (`messages.read_messages`: each image part is an `<image>` marker where it
                  stands), `images` -> `image`, leading system messages -> `system` (it replaces the
                  template's system prompt)
    text          {"text": "<formatted conversation>"} (SFTTrainer's `dataset_text_field`): kept as it
                  is; every token is supervised
    preference    `chosen` / `rejected` (DPO): kept as it is, read by `preference_parts`

A `messages` record whose form is broken stays as it is; `llava_tiny.checks` reports it
(`read_messages(...).problems`), in the file's own words.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .messages import read_messages as read_chat_messages


class DataFileError(ValueError):
    """A data file that cannot be read as LLaVA samples; the message names the file and the record."""


def load_samples(path: str) -> list[dict]:
    """Read LLaVA data: a JSON list of sample objects, or JSONL (one object per line).

    A `.jsonl` file is always read line by line (a one-line JSONL file is valid JSON too).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found; expected a LLaVA JSON or JSONL data file") from None
    data = None
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                # A list that does not parse is a broken JSON file, not JSONL: say where.
                raise DataFileError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} "
                                    f"({err.msg}); expected a JSON list of samples") from None
    if data is None:
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFileError(f"{path}: line {number} is not valid JSON ({err.msg}); "
                                        "expected a JSON list or JSONL (one sample per line)") from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of samples, found a JSON {type(data).__name__}")
    for index, sample in enumerate(data):
        if not isinstance(sample, dict):
            raise DataFileError(f"{path}: record {index} is a {type(sample).__name__}; expected an object with "
                                "'conversations' (LLaVA), 'messages' (OpenAI/TRL) or a formatted 'text'")
    return [normalise_record(sample) for sample in data]


def sample_id(sample: dict, index: int) -> str:
    """The name used for a sample in messages: its `id`, or `#<index>` when it has none."""
    value = sample.get("id")
    return f"#{index}" if value is None else str(value)


def sample_images(sample: dict) -> list[str]:
    """The sample's image paths as a list (`image` may be absent, one path, or a list)."""
    image = sample.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


SFT_FORMATS = ("conversations", "messages", "text")
_ROLES = {"user": "human", "assistant": "gpt"}


def record_format(sample: dict) -> str:
    """Which form a record has, by its fields: "preference", "conversations", "messages" or "text".

    A record with none of them counts as "conversations" (the checks say that it is missing).
    """
    if is_preference_record(sample):
        return "preference"
    return next((name for name in SFT_FORMATS if name in sample), "conversations")


@dataclass
class MessagesRecord:
    """A `messages` record read into the LLaVA form; `problems` lists (kind, message) about its form."""

    conversations: list = field(default_factory=list)
    system: str | None = None
    problems: list = field(default_factory=list)


def read_messages(sample: dict) -> MessagesRecord:
    """Read `messages` (OpenAI / TRL / LLaMA-Factory) into LLaVA turns (`messages.read_messages`, images
    listed apart in the record); the order of turns is left to the turn rules (`conversation.turn_problems`)."""
    read = MessagesRecord()
    messages = sample.get("messages")
    if not isinstance(messages, list) or not messages:
        read.problems.append(("bad_conversations", f"'messages' is {str(messages)[:60]!r}; expected a non-empty list "
                                                   "of {role, content} messages"))
        return read
    turns = read_chat_messages(messages, images_inline=False)
    read.problems = [(problem.kind, problem.message) for problem in turns.problems]
    read.system = turns.system
    read.conversations = [{"from": _ROLES[role], "value": text} for role, text in turns.turns]
    return read


def normalise_record(sample: dict) -> dict:
    """`sample` in the internal form (see the module doc); other fields are kept."""
    kind = record_format(sample)
    if kind == "conversations":
        turns = sample.get("conversations")
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and first.get("from") == "system" and isinstance(first.get("value"), str):
            return {**sample, "system": first["value"], "conversations": turns[1:]}
        return sample
    if kind in ("messages", "text") and "image" not in sample and "images" in sample:
        sample = {**{k: v for k, v in sample.items() if k != "images"}, "image": sample["images"]}
    if kind != "messages":
        return sample
    read = read_messages(sample)
    if read.problems:
        return sample  # the checks report it
    normal = {k: v for k, v in sample.items() if k != "messages"}
    normal["conversations"] = read.conversations
    if read.system is not None:
        normal["system"] = read.system
    return normal


# --- preference records (DPO) ------------------------------------------------------------------------
# Two forms, told apart by their fields:
#   LLaVA-NeXT  {"id", "image", "prompt": "<image>\n...", "chosen": "...", "rejected": "..."}, earlier
#               turns optionally as LLaVA `conversations` (complete human/gpt pairs)
#   messages    {"id", "image", "messages": [{"role": "user"|"assistant", "content": ...}, ...ending with the
#               user's question], "chosen": {"role": "assistant", "content": ...}, "rejected": {...}}
#               (TRL's conversational form, `prompt` as a list of messages, reads the same). Messages are
#               read as SFT `messages` are (`messages.read_messages`); a leading system message is dropped.
@dataclass
class PreferenceParts:
    """A preference record read into LLaVA pieces; a piece that cannot be read is None (see `problems`)."""

    history: list = field(default_factory=list)  # earlier turns as LLaVA {from, value} dicts
    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    problems: list = field(default_factory=list)  # (kind, message) about the record's form


def is_preference_record(sample: dict) -> bool:
    """Whether `sample` is a preference pair (it has `chosen` or `rejected`), not an SFT conversation."""
    return "chosen" in sample or "rejected" in sample


def _answer_text(answer) -> str | None:
    """An answer: a string, an assistant message, or a list holding one assistant message."""
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, dict):
        if answer.get("role", "assistant") != "assistant":
            return None
        read = read_chat_messages([{**answer, "role": "assistant"}], images_inline=False)
        return None if read.problems else read.turns[0][1]
    return answer if isinstance(answer, str) else None


def preference_parts(sample: dict) -> PreferenceParts:
    """Read a preference record of either form into (earlier turns, prompt, chosen, rejected)."""
    parts = PreferenceParts(chosen=_answer_text(sample.get("chosen")), rejected=_answer_text(sample.get("rejected")))
    messages = sample.get("messages", sample.get("prompt"))
    if isinstance(messages, str):  # LLaVA-NeXT form
        parts.prompt = messages
        history = sample.get("conversations") or []
        parts.history = history if isinstance(history, list) else []
        if not isinstance(history, list):
            parts.problems.append(("bad_conversations", "'conversations' (earlier turns) is not a list of turns"))
        return parts
    if not isinstance(messages, list) or not messages:
        return parts
    read = read_chat_messages(messages, images_inline=False)  # a leading system message is not compared: dropped
    if read.problems:
        parts.problems.append((read.problems[0].kind, read.problems[0].message))
        return parts
    parts.history = [{"from": _ROLES[role], "value": text} for role, text in read.turns]
    if not parts.history or parts.history[-1]["from"] != "human":
        ending = "end with an assistant message" if parts.history else "hold no user message"
        parts.problems.append(("bad_roles", f"the messages {ending}; expected the user's question last (the answers "
                                            "are `chosen` and `rejected`)"))
        return parts
    parts.prompt = parts.history.pop()["value"]
    return parts
