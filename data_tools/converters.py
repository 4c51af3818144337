"""The converters behind `python -m data_tools.convert`: tables, caption sets and image folders -> LLaVA records.

Every function returns (records, skipped rows); none reads command-line arguments. Column names
match case-insensitively (`tables.pick_column`) and a row's other columns are kept as fields.
"""
from __future__ import annotations

import json
import os
import posixpath
from collections import Counter

from .embedded_images import IMAGE_SUFFIXES
from .io import DataToolError
from .records import (CAPTION_PROMPT, caption_records, extra_fields, infer_answer_types, make_record,
                      normalize_answer_type)
from .tables import Table, cell_text, pick_column, row_filter

VQA_ROLES = ("image", "question", "answer", "answer_type", "question_type", "id")
DEFAULT_CLASS_QUESTION = "What is in the image?"
VQA_TASK = "vqa"  # the `task` label eval.score reads (captions say so by their question_type, "caption")


def _answers(value) -> list[str]:
    """Reference answers from a cell: a string, a number, or a list (VQAv2 lists hold {"answer": ...})."""
    values = value if isinstance(value, list) else [value]
    texts = [cell_text(v.get("answer") if isinstance(v, dict) else v) for v in values]
    return [t for t in texts if t]


def _kept_rows(table: Table, where, id_column: str | None, id_prefix: str):
    """(row number, sample id, row) for each row that `where` keeps; ids from `id_column`, else the row number."""
    keep = row_filter(table.columns, list(where), table.label)
    for number, row in enumerate(table.rows()):
        if keep(row):
            yield number, f"{id_prefix}{cell_text(row.get(id_column)) if id_column else number}", row


def vqa_records(table: Table, columns: dict[str, str | None] | None = None, where: list[tuple[str, str]] = (),
                id_prefix: str = "", instruction: str = "", image_prefix: str = "", source: str | None = None,
                answer_type: str = "auto", image_of=None) -> tuple[list[dict], list[dict], list[dict]]:
    """LLaVA records from the rows of a VQA table, the rows skipped, and why each question got its answer type.

    `columns`: role (image, question, answer, answer_type, question_type, id) -> column name the
    user gave (missing: the usual names, see `tables.DEFAULT_COLUMNS`). `image_of(row, number)`
    gives a row's image path (embedded images are written by it); without it the image column
    holds the path, joined to `image_prefix`. `answer_type`: closed/open for every record, or auto
    (the answer-type column, else `records.infer_answer_types`). Other columns are kept as fields; `task` is
    "vqa" unless the table has a `task` column.
    """
    columns = columns or {}
    label = table.label
    pick = {role: pick_column(table.columns, columns.get(role), role, label,
                              required=role in ("image", "question", "answer")) for role in VQA_ROLES}
    records, skipped = [], []
    for number, sid, row in _kept_rows(table, where, pick["id"], id_prefix):
        question, references = cell_text(row.get(pick["question"])), _answers(row.get(pick["answer"]))
        missing = [name for name, value in (("question", question), ("answer", references)) if not value]
        image = None
        if not missing:
            image = image_of(row, number) if image_of else cell_text(row.get(pick["image"]))
            if not image:
                missing.append("image")
        if missing:
            skipped.append({"row": number, "id": sid, "reason": f"empty {' and '.join(missing)}"})
            continue
        if not image_of and image_prefix:
            image = posixpath.join(image_prefix, image)
        given_type = normalize_answer_type(row.get(pick["answer_type"]) if pick["answer_type"] else None,
                                           references[0], f"{label}: row {number} (sample {sid!r})")
        question_type = (cell_text(row.get(pick["question_type"])) or None) if pick["question_type"] else None
        # `task` tells eval.score these are questions, so it does not also score their answers as captions;
        # a table's own `task` column wins
        records.append(make_record(sid, image, question + (f"\n{instruction}" if instruction else ""),
                                   references[0], references, given_type, question_type, source,
                                   {"task": VQA_TASK, **extra_fields(row, pick.values())}))
    _check_unique_ids(records, label)
    reasons = infer_answer_types(records, answer_type, pick["answer_type"])
    return records, skipped, reasons


def _check_unique_ids(records: list[dict], label: str) -> None:
    duplicates = [sid for sid, n in Counter(r["id"] for r in records).items() if n > 1]
    if duplicates:
        raise DataToolError(f"{label}: ids {duplicates[:5]} occur more than once; expected unique ids "
                            "(use --id-column none to number the rows, or --id-prefix per file)")


def _captions(cell) -> list[str]:
    values = cell if isinstance(cell, list) else [cell]
    texts = []
    for value in values:
        if isinstance(value, dict):  # Karpathy-style {"raw": ...} / {"caption": ...}
            value = value.get("raw") or value.get("caption") or value.get("text")
        if cell_text(value):
            texts.append(cell_text(value))
    return texts


def caption_table_records(table: Table, image_column: str | None = None, caption_columns: list[str] = (),
                          id_column: str | None = None, where: list[tuple[str, str]] = (), mode: str = "per-image",
                          prompt: str = CAPTION_PROMPT, id_prefix: str = "", source: str | None = None,
                          image_prefix: str = "", image_of=None) -> tuple[list[dict], list[dict]]:
    """Caption records from a table: an image column and one or more caption columns (a cell may hold a
    list of captions), or one row per caption: rows of the same image are merged, so `references` holds
    every caption of the image. Other columns are kept as fields (from the image's first row)."""
    label = table.label
    image_col = pick_column(table.columns, image_column, "image", label)
    caption_cols = [pick_column(table.columns, name, "caption", label) for name in caption_columns] or [
        pick_column(table.columns, None, "caption", label)]
    id_col = pick_column(table.columns, id_column, "id", label, required=False)
    by_image: dict[str, dict] = {}  # image -> {"sid", "captions", "extra"}, in order of first appearance
    skipped = []
    for number, sid, row in _kept_rows(table, where, id_col, id_prefix):
        captions = [text for column in caption_cols for text in _captions(row.get(column))]
        image = (image_of(row, number) if image_of else cell_text(row.get(image_col))) if captions else ""
        if not captions or not image:
            skipped.append({"row": number, "id": sid, "reason": "empty caption" if not captions else "no image"})
            continue
        if not image_of and image_prefix:
            image = posixpath.join(image_prefix, image)
        entry = by_image.setdefault(image, {"sid": sid, "captions": [],
                                            "extra": extra_fields(row, [image_col, id_col, *caption_cols])})
        entry["captions"] += captions
    records = []
    for image, entry in by_image.items():
        records += caption_records(entry["sid"], image, entry["captions"], mode, prompt, source, extra=entry["extra"])
    _check_unique_ids(records, label)
    return records, skipped


def imagefolder_records(root: str, question: str = DEFAULT_CLASS_QUESTION, image_prefix: str = "",
                        id_prefix: str = "", source: str | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """ROOT/<class>/<image> -> one closed question per image, answered by its class; also the class list.

    Image paths are relative to ROOT (joined to `image_prefix`); each record keeps its class as `label` and says
    `task` "vqa".
    Files that are not images by their extension are skipped and listed.
    """
    if not os.path.isdir(root):
        raise DataToolError(f"{root}: not a folder; expected ROOT/<class>/<image> (one subfolder per class)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise DataToolError(f"{root}: no class subfolders; expected ROOT/<class>/<image>")
    records, skipped = [], []
    for name in classes:
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, name))):
            dirnames.sort()
            for filename in sorted(filenames):
                relative = os.path.relpath(os.path.join(dirpath, filename), root).replace(os.sep, "/")
                if os.path.splitext(filename)[1].lower() not in IMAGE_SUFFIXES:
                    skipped.append({"file": relative, "reason": "not an image file (by its extension)"})
                    continue
                image = posixpath.join(image_prefix, relative) if image_prefix else relative
                records.append(make_record(f"{id_prefix}{posixpath.splitext(relative)[0]}", image, question, name,
                                           [name], "closed", source=source, extra={"label": name, "task": VQA_TASK}))
    return records, skipped, classes


def coco_to_records(path: str, mode: str, image_prefix: str = "", prompt: str = CAPTION_PROMPT, id_prefix: str = "",
                    source: str | None = None) -> tuple[list[dict], list[dict]]:
    """LLaVA records from a COCO captions file (`images` + `annotations`), and what was skipped."""
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise DataToolError(f"{path}: expected a COCO captions object with 'images' and 'annotations'")
    captions: dict = {image["id"]: [] for image in coco["images"]}
    skipped = []
    for number, ann in enumerate(coco["annotations"]):
        if ann.get("image_id") not in captions:
            skipped.append({"annotation": ann.get("id", number), "reason": f"unknown image_id {ann.get('image_id')!r}"})
            continue
        captions[ann["image_id"]].append((ann.get("id", number), ann.get("caption")))
    records = []
    for image in coco["images"]:
        pairs = [(cid, c) for cid, c in captions[image["id"]] if isinstance(c, str) and c.strip()]
        if not pairs:
            skipped.append({"image": image.get("file_name"), "reason": "no caption"})
            continue
        file_name = posixpath.join(image_prefix, image["file_name"]) if image_prefix else image["file_name"]
        records += caption_records(f"{id_prefix}{image['id']}", file_name, [c for _, c in pairs], mode, prompt,
                                   source, [cid for cid, _ in pairs])
    return records, skipped
