"""Reading LLaVA data files: one reader for training, evaluation and the data tools (SFT conversations and
preference pairs)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field


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
            raise DataFileError(f"{path}: record {index} is a {type(sample).__name__}; "
                                "expected an object with 'id' and 'conversations'")
    return data


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


# --- preference records (DPO) ------------------------------------------------------------------------
# Two forms, told apart by their fields:
#   LLaVA-NeXT  {"id", "image", "prompt": "<image>\n...", "chosen": "...", "rejected": "..."}, earlier
#               turns optionally as LLaVA `conversations` (complete human/gpt pairs)
#   messages    {"id", "image", "messages": [{"role": "user"|"assistant", "content": ...}, ...ending with the
#               user's question], "chosen": {"role": "assistant", "content": ...}, "rejected": {...}}
#               (TRL's conversational form, `prompt` as a list of messages, reads the same). `content` is
#               a string or a list of {"type": "text", "text"} / {"type": "image"} parts; image parts
#               become `<image>` markers before the text, as in LLaVA's data.
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


def _message_text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        images = sum(1 for p in content if p.get("type") == "image")
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        return "<image>\n" * images + "".join(texts) if all(isinstance(t, str) for t in texts) else None
    return None


def _answer_text(answer) -> str | None:
    """An answer: a string, an assistant message, or a list holding one assistant message."""
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, dict):
        return _message_text(answer.get("content")) if answer.get("role", "assistant") == "assistant" else None
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
    turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    roles = {"user": "human", "assistant": "gpt"}
    for i, message in enumerate(turns):
        text = _message_text(message.get("content")) if isinstance(message, dict) else None
        if text is None or message.get("role") not in roles:
            parts.problems.append(("bad_conversations", f"message {i} is {message!r}; expected {{role: user|assistant, "
                                                        "content: text or parts}"))
            return parts
        parts.history.append({"from": roles[message["role"]], "value": text})
    if parts.history[-1]["from"] != "human":
        parts.problems.append(("bad_roles", "the messages end with an assistant message; expected the user's "
                                            "question last (the answers are `chosen` and `rejected`)"))
        return parts
    parts.prompt = parts.history.pop()["value"]
    return parts
