"""The LLaVA records the converters write: one question (or caption) per record, with the fields
evaluation reads (`references`, `answer_type`, `question_type`, `source`)."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

from .io import DataToolError

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
ANSWER_TYPES = {"closed": "closed", "open": "open", "yes/no": "closed", "number": "open", "other": "open"}
ANSWER_TYPE_CHOICES = ("auto", "closed", "open")  # --answer-type
# The closed-set rule: a question asked at least this often, whose distinct answers number at most
# CLOSED_SET_MAX_ANSWERS and at most half the times it is asked, is a choice among fixed answers.
CLOSED_SET_MIN_ASKED = 4
CLOSED_SET_MAX_ANSWERS = 20
RECORD_FIELDS = ("id", "image", "conversations", "question_type", "answer_type", "references", "source")


def normalize_answer_type(value, answer: str, where: str) -> str | None:
    """`closed`/`open` from a VQA answer-type value; `closed` for a yes/no answer without one, else None
    (undecided: `infer_answer_types` looks at all the answers of the question)."""
    if value is None or str(value).strip() == "":
        return "closed" if answer.strip().lower() in ("yes", "no") else None
    key = str(value).strip().lower()
    if key not in ANSWER_TYPES:
        raise DataToolError(f"{where}: answer type {value!r}; expected one of {sorted(ANSWER_TYPES)}")
    return ANSWER_TYPES[key]


def extra_fields(row: dict, used_columns) -> dict:
    """The row's other columns, kept as record fields (e.g. `label`, for `partition --stratify label` and
    `eval.score --group-by label`): values that JSON can hold, names the record does not use itself."""
    used = set(used_columns)
    extra = {}
    for name, value in row.items():
        if name in used or name in RECORD_FIELDS:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):  # image bytes and other binary cells
            continue
        extra[name] = value
    return extra


def _question_text(record: dict) -> str:
    return record["conversations"][0]["value"]


def _answer_text(record: dict) -> str:
    return record["conversations"][1]["value"].strip().lower()


def _closed_set_rule(asked: int, distinct: int) -> tuple[str, str]:
    """(answer type, why) for a question asked `asked` times with `distinct` distinct answers."""
    numbers = f"asked {asked} times, {distinct} distinct answers"
    if asked < CLOSED_SET_MIN_ASKED:
        return "open", f"closed-set rule: {numbers}; fewer than {CLOSED_SET_MIN_ASKED} askings tell no fixed set"
    if distinct > CLOSED_SET_MAX_ANSWERS:
        return "open", f"closed-set rule: {numbers}; more than {CLOSED_SET_MAX_ANSWERS} distinct answers"
    if distinct > asked / 2:
        return "open", f"closed-set rule: {numbers}; more than half as many answers as askings"
    return "closed", (f"closed-set rule: {numbers} (at least {CLOSED_SET_MIN_ASKED} askings, at most "
                      f"{CLOSED_SET_MAX_ANSWERS} answers and at most half the askings): a choice among fixed answers")


def _grouped(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[_question_text(record)].append(record)
    return groups


def _reason(question: str, group: list[dict], why: str) -> dict:
    types = Counter(r["answer_type"] for r in group)
    return {"question": question.replace("<image>\n", "").replace("<image>", "").strip(),
            "answer_type": next(iter(types)) if len(types) == 1 else dict(types),
            "asked": len(group), "distinct_answers": len({_answer_text(r) for r in group}), "why": why}


def explain_answer_types(records: list[dict], why: str) -> list[dict]:
    """Per distinct question, its answer type and `why` (one reason for all: converters whose type is fixed),
    most asked first: the shape `infer_answer_types` returns."""
    reasons = [_reason(q, group, why) for q, group in _grouped(records).items()]
    return sorted(reasons, key=lambda r: -r["asked"])


def infer_answer_types(records: list[dict], override: str = "auto", column: str | None = None) -> list[dict]:
    """Set every record's `answer_type`: `override` when it is closed/open, else the closed-set rule for the
    records still undecided (None): a question asked >= CLOSED_SET_MIN_ASKED times whose distinct answers
    number <= CLOSED_SET_MAX_ANSWERS and <= half the times it is asked is `closed`, any other `open`.

    Returns why, per distinct question, most asked first: {"question", "answer_type" (or {type: count}
    when its records differ), "asked", "distinct_answers", "why"}. `column`: the answer-type column
    the undecided records were read against (named in the reason), if any.
    """
    if override not in ANSWER_TYPE_CHOICES:
        raise DataToolError(f"--answer-type {override!r}; expected one of {ANSWER_TYPE_CHOICES}")
    reasons = []
    for question, group in _grouped(records).items():
        undecided = [r for r in group if r.get("answer_type") is None]
        if override != "auto":
            why = f"--answer-type {override}"
            for record in group:
                record["answer_type"] = override
        elif undecided:
            answer_type, why = _closed_set_rule(len(group), len({_answer_text(r) for r in group}))
            for record in undecided:
                record["answer_type"] = answer_type
            if len(undecided) < len(group):
                why += f" ({len(group) - len(undecided)} of its records were given a type already)"
        else:
            why = (f"given: the {column!r} column, or a yes/no answer where it is empty" if column
                   else "given: yes/no answers are closed")
        reasons.append(_reason(question, group, why))
    return sorted(reasons, key=lambda r: -r["asked"])


def make_record(sid: str, image: str | None, question: str, answer: str, references: list[str],
                answer_type: str | None, question_type: str | None = None, source: str | None = None,
                extra: dict | None = None) -> dict:
    """One single-turn LLaVA sample with the evaluation fields the project uses, then `extra` fields."""
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
    record.update({key: value for key, value in (extra or {}).items() if key not in record})
    return record


def caption_records(sid: str, image: str, captions: list[str], mode: str, prompt: str = CAPTION_PROMPT,
                    source: str | None = None, caption_ids: list | None = None, extra: dict | None = None) -> list[dict]:
    """per-image: one record, first caption as target; per-caption: one record per caption.

    `references` always holds every caption of the image (what caption metrics compare with).
    """
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        return []
    if mode == "per-image":
        return [make_record(sid, image, prompt, captions[0], captions, "open", "caption", source, extra)]
    ids = caption_ids or list(range(len(captions)))
    return [make_record(f"{sid}-{cid}", image, prompt, caption, captions, "open", "caption", source, extra)
            for cid, caption in zip(ids, captions)]
