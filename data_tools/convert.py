"""Convert VQA tables, COCO captions and parquet/arrow files with embedded images to LLaVA JSON.

    python -m data_tools.convert vqa --input slake_train.json --out slake.json --image-prefix imgs \\
        --where q_lang=en --question-type-column content_type --id-prefix slake-
    python -m data_tools.convert coco --input captions_val2014.json --out coco.json \\
        --image-prefix val2014 --caption-mode per-image
    python -m data_tools.convert parquet --input train-00000-of-00001.parquet --out pathvqa.json \\
        --image-folder data/images --image-subdir pathvqa

Every record gets `references` (the answer, or all captions of the image) and `answer_type`
(`closed`/`open`; from the answer-type column, else `closed` for yes/no answers), plus
`question_type` when there is such a column (always `caption` for captions) and `source` with
--source. Rows without a question, answer or image are skipped and listed in the report.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import posixpath
from collections import Counter

from .io import DataToolError, add_report_argument, check_output_path, cli_errors, write_report, write_samples

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
# Column names tried in order when no --*-column flag is given (VQA-RAD, SLAKE, PathVQA, HF sets).
DEFAULT_COLUMNS = {
    "image": ("image", "image_name", "img_name", "image_path", "img_path", "file_name", "image_id", "img_id"),
    "question": ("question", "sent", "query"),
    "answer": ("answer", "answers", "label"),
    "answer_type": ("answer_type",),
    "question_type": ("question_type",),
    "id": ("qid", "question_id", "id"),
    "caption": ("caption", "captions", "sentences", "text"),
}
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


def read_rows(path: str) -> list[dict]:
    """Rows of a VQA table: JSON list of objects, JSONL, or CSV with a header line."""
    if not os.path.isfile(path):
        raise DataToolError(f"{path}: file not found")
    if path.lower().endswith(".csv"):
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DataToolError(f"{path}: not JSON, JSONL or CSV ({err.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataToolError(f"{path}: expected a list of objects (one per question)")
    return rows


def pick_column(columns, wanted: str | None, role: str, path: str, required: bool = True) -> str | None:
    """The column for `role`: `wanted` when given (must exist), else the first default present."""
    if wanted is not None:
        if wanted.lower() == "none":
            return None
        if wanted not in columns:
            raise DataToolError(f"{path}: no column {wanted!r} for the {role}; columns are {sorted(columns)}")
        return wanted
    for name in DEFAULT_COLUMNS[role]:
        if name in columns:
            return name
    if required:
        raise DataToolError(f"{path}: no {role} column (tried {', '.join(DEFAULT_COLUMNS[role])}); "
                            f"columns are {sorted(columns)}; name it with --{role.replace('_', '-')}-column")
    return None


def parse_where(conditions) -> list[tuple[str, str]]:
    pairs = []
    for condition in conditions or ():
        column, sep, value = condition.partition("=")
        if not sep or not column:
            raise DataToolError(f"--where {condition!r}: expected COLUMN=VALUE")
        pairs.append((column, value))
    return pairs


def cell_text(value) -> str:
    """A table cell as stripped text ('' for None)."""
    if value is None:
        return ""
    return str(value).strip()


def _answers(value) -> list[str]:
    """Reference answers from a cell: a string, a number, or a list (VQAv2 lists hold {"answer": ...})."""
    values = value if isinstance(value, list) else [value]
    texts = [cell_text(v.get("answer") if isinstance(v, dict) else v) for v in values]
    return [t for t in texts if t]


def rows_to_vqa(rows, columns, path: str, args, image_of=None) -> tuple[list[dict], list[dict]]:
    """LLaVA records from VQA rows (an iterable of dicts with these `columns`), and the rows skipped.

    `image_of(row, number)` gives a row's image path (parquet images are extracted by it);
    without it the image column holds the path.
    """
    image_col = pick_column(columns, args.image_column, "image", path)
    question_col = pick_column(columns, args.question_column, "question", path)
    answer_col = pick_column(columns, args.answer_column, "answer", path)
    type_col = pick_column(columns, args.answer_type_column, "answer_type", path, required=False)
    qtype_col = pick_column(columns, args.question_type_column, "question_type", path, required=False)
    id_col = pick_column(columns, args.id_column, "id", path, required=False)
    where = parse_where(args.where)
    records, skipped = [], []
    for number, row in enumerate(rows):
        if any(cell_text(row.get(column)) != value for column, value in where):
            continue
        sid = f"{args.id_prefix}{cell_text(row.get(id_col)) if id_col else number}"
        question, references = cell_text(row.get(question_col)), _answers(row.get(answer_col))
        missing = [name for name, value in (("question", question), ("answer", references)) if not value]
        image = None
        if not missing:
            image = image_of(row, number) if image_of else cell_text(row.get(image_col))
            if not image:
                missing.append("image")
        if missing:
            skipped.append({"row": number, "id": sid, "reason": f"empty {' and '.join(missing)}"})
            continue
        if not image_of and args.image_prefix:
            image = posixpath.join(args.image_prefix, image)
        answer_type = normalize_answer_type(row.get(type_col) if type_col else None, references[0],
                                            f"{path}: row {number} (sample {sid!r})")
        question_type = (cell_text(row.get(qtype_col)) or None) if qtype_col else None
        records.append(make_record(sid, image, question + (f"\n{args.instruction}" if args.instruction else ""),
                                   references[0], references, answer_type, question_type, args.source))
    duplicates = [sid for sid, n in Counter(r["id"] for r in records).items() if n > 1]
    if duplicates:
        raise DataToolError(f"{path}: ids {duplicates[:5]} occur more than once; expected unique ids "
                            "(use --id-column none to number the rows, or --id-prefix per file)")
    return records, skipped


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="LLaVA JSON to write (JSONL when it ends with .jsonl)")
    common.add_argument("--id-prefix", default="", help="prepended to every sample id (keep ids unique across sets)")
    common.add_argument("--source", help="value of the `source` field of every record")
    add_report_argument(common)
    columns = argparse.ArgumentParser(add_help=False)
    for role in ("image", "question", "answer", "answer_type", "question_type", "id"):
        columns.add_argument(f"--{role.replace('_', '-')}-column", dest=f"{role}_column",
                             help=f"column with the {role.replace('_', ' ')} (default: first of "
                                  f"{', '.join(DEFAULT_COLUMNS[role])}; 'none' = ignore)")
    columns.add_argument("--where", nargs="+", metavar="COLUMN=VALUE", help="keep only rows matching all of these")
    columns.add_argument("--instruction", default="", help="text added on a new line after each question")
    vqa = formats.add_parser("vqa", parents=[common, columns], help="VQA table: JSON, JSONL or CSV")
    vqa.add_argument("--input", required=True)
    vqa.add_argument("--image-prefix", default="", help="folder prepended to image names (relative to --image_folder)")
    coco = formats.add_parser("coco", parents=[common], help="COCO captions JSON (images + annotations)")
    coco.add_argument("--input", required=True)
    coco.add_argument("--image-prefix", default="", help="folder prepended to file names (e.g. val2014)")
    coco.add_argument("--caption-mode", choices=("per-image", "per-caption"), default="per-image")
    coco.add_argument("--prompt", default=CAPTION_PROMPT, help=f"the human turn (default {CAPTION_PROMPT!r})")
    table = formats.add_parser("parquet", parents=[common, columns],
                               help="parquet / arrow files with embedded image bytes (as HF datasets writes them)")
    table.add_argument("--input", required=True, nargs="+", help="one or more .parquet or .arrow files")
    table.add_argument("--image-folder", required=True, help="the folder training will get as --image_folder")
    table.add_argument("--image-subdir", default="images", help="images are written to IMAGE_FOLDER/IMAGE_SUBDIR")
    table.add_argument("--caption-column", help="caption column, for caption sets without a question column")
    table.add_argument("--caption-mode", choices=("per-image", "per-caption"), default="per-image")
    table.add_argument("--prompt", default=CAPTION_PROMPT, help="the human turn of caption records")
    return parser


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    inputs = args.input if isinstance(args.input, list) else [args.input]
    check_output_path(args.out, inputs)
    check_output_path(args.report, [*inputs, args.out])
    extra = {}
    if args.format == "vqa":
        rows = read_rows(args.input)
        records, skipped = rows_to_vqa(rows, set().union(*(r.keys() for r in rows)), args.input, args)
    elif args.format == "coco":
        records, skipped = coco_to_records(args.input, args.caption_mode, args.image_prefix, args.prompt,
                                           args.id_prefix, args.source)
    else:
        from .parquet import convert_tables

        records, skipped, extra = convert_tables(inputs, args)
    write_samples(args.out, records)
    answer_types = dict(sorted(Counter(r["answer_type"] for r in records).items()))
    print(f"{', '.join(inputs)} ({args.format}): wrote {len(records)} samples to {args.out}; skipped {len(skipped)}; "
          f"answer types {answer_types}" + (f"; {extra['images_written']} images written to "
                                            f"{extra['image_dir']}" if extra else ""))
    for item in skipped[:10]:
        print(f"  skipped: {item}")
    write_report(args.report, {"format": args.format, "inputs": inputs, "out": args.out, "samples": len(records),
                               "answer_types": answer_types, "skipped": skipped, **extra})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
