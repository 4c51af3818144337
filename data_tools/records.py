"""The LLaVA records the converters write: one question (or caption) per record, with the fields
evaluation reads (`references`, `answer_type`, `question_type`, `source`)."""
from __future__ import annotations

from .io import DataToolError

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
ANSWER_TYPES = {"closed": "closed", "open": "open", "yes/no": "closed", "number": "open", "other": "open"}


def normalize_answer_type(value, answer: str, where: str) -> str:
    """`closed`/`open` from a VQA answer-type value; inferred from the answer when missing."""
    if value is None or str(value).strip() == "":
        return "closed" if answer.strip().lower() in ("yes", "no") else "open"
    key = str(value).strip().lower()
    if key not in ANSWER_TYPES:
        raise DataToolError(f"{where}: answer type {value!r}; expected one of {sorted(ANSWER_TYPES)}")
    return ANSWER_TYPES[key]


def make_record(sid: str, image: str | None, question: str, answer: str, references: list[str], answer_type: str,
                question_type: str | None = None, source: str | None = None) -> dict:
    """One single-turn LLaVA sample with the evaluation fields the project uses."""
    record = {"id": sid}
    if image is not None:
        record["image"] = image
    record["conversations"] = [{"from": "human", "value": f"<image>\n{question}" if image is not None else question},
                               {"from": "gpt", "value": answer}]
    if question_type is not None:
        record["question_type"] = question_type
    record["answer_type"] = answer_type
    record["references"] = references
    if source is not None:
        record["source"] = source
    return record


def caption_records(sid: str, image: str, captions: list[str], mode: str, prompt: str = CAPTION_PROMPT,
                    source: str | None = None, caption_ids: list | None = None) -> list[dict]:
    """per-image: one record, first caption as target; per-caption: one record per caption.

    `references` always holds every caption of the image (what caption metrics compare with).
    """
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        return []
    if mode == "per-image":
        return [make_record(sid, image, prompt, captions[0], captions, "open", "caption", source)]
    ids = caption_ids or list(range(len(captions)))
    return [make_record(f"{sid}-{cid}", image, prompt, caption, captions, "open", "caption", source)
            for cid, caption in zip(ids, captions)]
