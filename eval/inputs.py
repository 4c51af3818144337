"""The inputs of `eval.score`: a predictions file, reference files, and the kind (caption or VQA) of each line.

A predictions line (as `eval.generate` writes it) holds `id`, `prediction`, `references` and the
sample's other fields; `check_records` says everything wrong with a file at once.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

logger = logging.getLogger("eval.score")

TASKS = ("auto", "caption", "vqa")
CAPTION = "caption"
VQA = "vqa"

def load_predictions(path: str) -> list[dict]:
    """The records of a predictions JSONL file (blank lines ignored); errors name the bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg}); expected one object per line, "
                                 "as eval.generate writes") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
            records.append(record)
    return records


def _as_reference_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: references must be a string or a list of strings; found {json.dumps(value)[:120]}")


def load_references(path: str) -> dict[str, list[str]]:
    """References keyed by id (and, for COCO files, also by image file name) from one of three formats.

    - COCO captions: {"annotations": [{"image_id", "caption"}], "images": [{"id", "file_name"}]};
      keyed by str(image_id) and by file_name, so lines match on `id` or on their `image`'s name;
    - VQA annotations: {"annotations": [{"question_id", "answers": [{"answer"}, ...]}]};
    - a plain map {id: [reference, ...]} (or {id: reference}).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (COCO/VQA annotation file or {{id: [refs]}}), "
                         f"found {type(data).__name__}")
    if "annotations" not in data:
        return {str(key): _as_reference_list(value, f"{path}[{key!r}]") for key, value in data.items()}

    refs: dict[str, list[str]] = {}
    for ann in data["annotations"]:
        if "caption" in ann and "image_id" in ann:
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        elif "answers" in ann and "question_id" in ann:
            refs[str(ann["question_id"])] = [a["answer"] for a in ann["answers"]]
        else:
            raise ValueError(f"{path}: annotation {json.dumps(ann)[:120]} has neither image_id+caption (COCO "
                             "captions) nor question_id+answers (VQA)")
    for image in data.get("images", []):
        if "file_name" in image and str(image.get("id")) in refs:
            refs.setdefault(image["file_name"], refs[str(image["id"])])
    return refs


def apply_references(records: list[dict], references: Mapping[str, list[str]]) -> list[dict]:
    """Copies of `records` whose `references` come from `references`, matched on `id`, then on the image name.

    Lines with no match keep their own references. Raises ValueError when no line matches at all
    (an id scheme mismatch, reported with an example from each side).
    """
    out, matched = [], 0
    for record in records:
        image = record.get("image")
        image = image[0] if isinstance(image, list) and image else image
        keys = [str(record.get("id"))] + ([os.path.basename(image)] if isinstance(image, str) and image else [])
        found = next((references[k] for k in keys if k in references), None)
        if found is not None:
            record = {**record, "references": _as_reference_list(found, f"references[{keys[0]!r}]")}
            matched += 1
        out.append(record)
    if records and references and not matched:
        raise ValueError(f"no prediction line matches the reference file: line ids look like "
                         f"{records[0].get('id')!r}, reference keys like {next(iter(references))!r}")
    logger.info("references from file for %d of %d lines", matched, len(records))
    return out


def task_of(record: dict, task: str = "auto") -> str:
    """The task of one record, "caption" or "vqa": `task` when not "auto", else from its fields.

    Auto rule: a caption when `question_type` or `task` is "caption" (any case), else VQA.
    """
    if task != "auto":
        return task
    labels = (record.get("question_type"), record.get("task"))
    return CAPTION if any(isinstance(v, str) and v.strip().lower() == CAPTION for v in labels) else VQA


def kind_labelled(record: dict) -> bool:
    """Whether a line says its kind: a non-empty `question_type` or `task`."""
    return any(isinstance(record.get(k), str) and record[k].strip() for k in ("question_type", "task"))


UNLABELLED_NOTE = ("{n} of {total} lines have no `question_type` or `task`, so their kind (caption or VQA) is not "
                   "labelled: they are scored both as captions (BLEU, METEOR, ROUGE-L, CIDEr) and as VQA (accuracy). "
                   "Choose with `--task caption` or `--task vqa`, or give each line a `task` (\"caption\" or "
                   "\"vqa\") or a `question_type`.")


def check_records(records: list[dict]) -> list[dict]:
    """Records with `references` as a list of strings; ValueError naming every malformed or duplicate id."""
    problems, seen, clean = [], set(), []
    for i, record in enumerate(records):
        rid = record.get("id")
        where = f"line {i + 1} (id {rid!r})"
        if rid is None:
            problems.append(f"{where}: no 'id'")
        elif str(rid) in seen:
            problems.append(f"{where}: id repeated")
        seen.add(str(rid))
        if not isinstance(record.get("prediction"), str):
            problems.append(f"{where}: 'prediction' must be a string, found {record.get('prediction')!r}")
        try:
            refs = _as_reference_list(record.get("references"), where)
        except ValueError as err:
            problems.append(str(err))
            continue
        if not refs:
            problems.append(f"{where}: no references (give them in the line or with --refs)")
        clean.append({**record, "references": refs})
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} problem(s) in the predictions:\n  {shown}{more}")
    return clean
