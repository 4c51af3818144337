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
import json
import posixpath
from collections import Counter

from .embedded_images import ImageWriter
from .io import DataToolError, add_report_argument, check_output_path, cli_errors, write_report, write_samples
from .records import CAPTION_PROMPT, caption_records, make_record, normalize_answer_type
from .tables import DEFAULT_COLUMNS, Table, cell_text, parse_where, pick_column, read_table, row_filter

VQA_ROLES = ("image", "question", "answer", "answer_type", "question_type", "id")


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
                image_of=None) -> tuple[list[dict], list[dict]]:
    """LLaVA records from the rows of a VQA table, and the rows skipped.

    `columns`: role (image, question, answer, answer_type, question_type, id) -> column name the
    user gave (missing: the usual names, see `tables.DEFAULT_COLUMNS`). `image_of(row, number)`
    gives a row's image path (embedded images are written by it); without it the image column
    holds the path, joined to `image_prefix`.
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
        answer_type = normalize_answer_type(row.get(pick["answer_type"]) if pick["answer_type"] else None,
                                            references[0], f"{label}: row {number} (sample {sid!r})")
        question_type = (cell_text(row.get(pick["question_type"])) or None) if pick["question_type"] else None
        records.append(make_record(sid, image, question + (f"\n{instruction}" if instruction else ""),
                                   references[0], references, answer_type, question_type, source))
    _check_unique_ids(records, label)
    return records, skipped


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


def caption_table_records(table: Table, image_column: str | None = None, caption_column: str | None = None,
                          id_column: str | None = None, where: list[tuple[str, str]] = (), mode: str = "per-image",
                          prompt: str = CAPTION_PROMPT, id_prefix: str = "", source: str | None = None,
                          image_prefix: str = "", image_of=None) -> tuple[list[dict], list[dict]]:
    """Caption records from a table with an image column and a caption column (a caption or a list of them)."""
    label = table.label
    image_col = pick_column(table.columns, image_column, "image", label)
    caption_col = pick_column(table.columns, caption_column, "caption", label)
    id_col = pick_column(table.columns, id_column, "id", label, required=False)
    records, skipped = [], []
    for number, sid, row in _kept_rows(table, where, id_col, id_prefix):
        captions = _captions(row.get(caption_col))
        image = (image_of(row, number) if image_of else cell_text(row.get(image_col))) if captions else ""
        if not captions or not image:
            skipped.append({"row": number, "id": sid, "reason": "empty caption" if not captions else "no image"})
            continue
        if not image_of and image_prefix:
            image = posixpath.join(image_prefix, image)
        records += caption_records(sid, image, captions, mode, prompt, source)
    _check_unique_ids(records, label)
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
    vqa = formats.add_parser("vqa", parents=[common, columns], help="VQA table: CSV, JSON, JSONL, parquet or arrow")
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


def _convert_table(args) -> tuple[list[dict], list[dict], dict]:
    """`convert vqa` and `convert parquet`: the same table reading, the images as paths or embedded bytes."""
    table = read_table(args.input if isinstance(args.input, list) else [args.input])
    where = parse_where(args.where)
    image_of, extra = None, {}
    if args.format == "parquet":
        writer = ImageWriter(args.image_folder, args.image_subdir.strip("/"))
        image_col = pick_column(table.columns, args.image_column, "image", table.label)

        def image_of(row, number):
            return writer.save(row.get(image_col), f"row {number}")

    has_question = args.question_column or any(
        name in {c.lower() for c in table.columns} for name in DEFAULT_COLUMNS["question"])
    if args.format == "parquet" and not has_question:
        records, skipped = caption_table_records(
            table, args.image_column, args.caption_column, args.id_column, where, args.caption_mode, args.prompt,
            args.id_prefix, args.source, image_of=image_of)
    else:
        columns = {role: getattr(args, f"{role}_column") for role in VQA_ROLES}
        records, skipped = vqa_records(table, columns, where, args.id_prefix, args.instruction,
                                       getattr(args, "image_prefix", ""), args.source, image_of)
    if args.format == "parquet":
        if writer.not_embedded:
            print(f"warning: {writer.not_embedded} rows reference image files instead of embedding them; "
                  "their paths are kept as they are")
        extra = writer.report()
    return records, skipped, extra


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    inputs = args.input if isinstance(args.input, list) else [args.input]
    check_output_path(args.out, inputs)
    check_output_path(args.report, [*inputs, args.out])
    extra = {}
    if args.format == "coco":
        records, skipped = coco_to_records(args.input, args.caption_mode, args.image_prefix, args.prompt,
                                           args.id_prefix, args.source)
    else:
        records, skipped, extra = _convert_table(args)
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
