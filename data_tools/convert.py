"""Convert VQA tables, caption tables, COCO captions, image folders and parquet/arrow files to LLaVA JSON.

    python -m data_tools.convert vqa --input slake_train.json --out slake.json --image-prefix imgs \\
        --where q_lang=en --question-type-column content_type --id-prefix slake-
    python -m data_tools.convert captions --input stamps.csv --out stamps.json --caption-column caption caption_2
    python -m data_tools.convert imagefolder --input photos --out photos.json --question "Which garment is this?"
    python -m data_tools.convert coco --input captions_val2014.json --out coco.json \\
        --image-prefix val2014 --caption-mode per-image
    python -m data_tools.convert parquet --input train-00000-of-00001.parquet --out pathvqa.json \\
        --image-folder data/images --image-subdir pathvqa
    python -m data_tools.convert preference --input RLAIF-V-Dataset_000.parquet --out pairs.json \\
        --image-folder data/images --image-subdir rlaifv       # DPO pairs (data_tools/preference.py)

Tables are CSV, JSON, JSONL, parquet or arrow; column names match in any case (`Question` is
`question`), and a row's other columns are kept as record fields (e.g. `label`: usable by
`partition --stratify label` and `eval.score --group-by label`).

Every record gets `references` (the answer, or all captions of the image) and `answer_type`:
`--answer-type closed|open` sets it for every record; `auto` (the default) takes the answer-type
column, else `closed` for yes/no answers, else the closed-set rule: a question asked at least 4
times whose distinct answers number at most 20 and at most half the times it is asked (a class
question) is `closed`, any other `open`. `imagefolder` questions are closed, captions open.
`question_type` comes from a column (always `caption` for captions), `source` from --source;
`vqa`, `parquet` questions and `imagefolder` records say `task: "vqa"`, so `eval.score` scores them as
questions only (a caption's `question_type` says it is one).
Rows without a question, answer, caption or image are skipped and listed in the report. The
terminal shows why the most asked questions got their answer type; `--report` lists every
question (`answer_type_reasons`: question, answer type, times asked, distinct answers, why).
"""
from __future__ import annotations

import argparse
from collections import Counter

from .converters import (DEFAULT_CLASS_QUESTION, VQA_ROLES, caption_table_records, coco_to_records,
                         imagefolder_records, vqa_records)
from .embedded_images import ImageWriter
from .io import add_report_argument, check_output_path, cli_errors, write_report, write_samples
from .preference import add_preference_parser, convert_preference
from .records import ANSWER_TYPE_CHOICES, CAPTION_PROMPT, explain_answer_types
from .tables import DEFAULT_COLUMNS, parse_where, pick_column, read_table

CAPTION_MODES = ("per-image", "per-caption")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="LLaVA JSON to write (JSONL when it ends with .jsonl)")
    common.add_argument("--id-prefix", default="", help="prepended to every sample id (keep ids unique across sets)")
    common.add_argument("--source", help="value of the `source` field of every record")
    add_report_argument(common)
    prefix = argparse.ArgumentParser(add_help=False)
    prefix.add_argument("--image-prefix", default="", help="folder prepended to image paths (relative to the "
                                                           "--image_folder training gets)")
    table = argparse.ArgumentParser(add_help=False)
    table.add_argument("--where", nargs="+", metavar="COLUMN=VALUE", help="keep only rows matching all of these")
    table.add_argument("--image-column", help=f"default: first of {', '.join(DEFAULT_COLUMNS['image'])}")
    table.add_argument("--id-column", help=f"default: first of {', '.join(DEFAULT_COLUMNS['id'])}; 'none' = "
                                           "number the rows")
    vqa_columns = argparse.ArgumentParser(add_help=False)
    for role in ("question", "answer", "answer_type", "question_type"):
        vqa_columns.add_argument(f"--{role.replace('_', '-')}-column", dest=f"{role}_column",
                                 help=f"column with the {role.replace('_', ' ')} (default: first of "
                                      f"{', '.join(DEFAULT_COLUMNS[role])}; 'none' = ignore)")
    vqa_columns.add_argument("--instruction", default="", help="text added on a new line after each question")
    vqa_columns.add_argument("--answer-type", choices=ANSWER_TYPE_CHOICES, default="auto",
                             help="closed or open for every record; auto: column, yes/no, closed-set rule")
    captions = argparse.ArgumentParser(add_help=False)
    captions.add_argument("--caption-mode", choices=CAPTION_MODES, default="per-image",
                          help="per-image: one record per image; per-caption: one per caption (all as references)")
    captions.add_argument("--prompt", default=CAPTION_PROMPT, help=f"the human turn (default {CAPTION_PROMPT!r})")
    vqa = formats.add_parser("vqa", parents=[common, prefix, table, vqa_columns],
                             help="VQA table: CSV, JSON, JSONL, parquet or arrow")
    vqa.add_argument("--input", required=True, nargs="+", help="one table, or shards of one table")
    cap = formats.add_parser("captions", parents=[common, prefix, table, captions],
                             help="caption table: an image column and caption column(s), or one row per caption")
    cap.add_argument("--input", required=True, nargs="+", help="one table, or shards of one table")
    cap.add_argument("--caption-column", nargs="+", default=[],
                     help=f"one or more caption columns (default: first of {', '.join(DEFAULT_COLUMNS['caption'])})")
    folder = formats.add_parser("imagefolder", parents=[common, prefix],
                                help="ROOT/<class>/<image>: one closed question per image, answered by its class")
    folder.add_argument("--input", required=True, help="ROOT: one subfolder per class")
    folder.add_argument("--question", default=DEFAULT_CLASS_QUESTION,
                        help=f"the question of every image (default {DEFAULT_CLASS_QUESTION!r})")
    coco = formats.add_parser("coco", parents=[common, prefix, captions], help="COCO captions JSON")
    coco.add_argument("--input", required=True)
    embedded = formats.add_parser("parquet", parents=[common, table, vqa_columns, captions],
                                  help="parquet / arrow files with embedded image bytes (as HF datasets writes them)")
    embedded.add_argument("--input", required=True, nargs="+", help="one or more .parquet or .arrow files")
    embedded.add_argument("--image-folder", required=True, help="the folder training will get as --image_folder")
    embedded.add_argument("--image-subdir", default="images", help="images are written to IMAGE_FOLDER/IMAGE_SUBDIR")
    embedded.add_argument("--caption-column", nargs="+", default=[],
                          help="caption column(s), for caption sets without a question column")
    add_preference_parser(formats, [common, prefix, table])  # DPO pairs (data_tools/preference.py)
    return parser


def _table_records(args, writer: ImageWriter | None = None) -> tuple[list[dict], list[dict], list[dict] | None]:
    """`vqa`, `captions` and `parquet`: one table reader; parquet without a question column is a caption set.
    Returns the records, the rows skipped and, for VQA, why each question got its answer type.

    With a `writer`, the image column holds embedded images, written to files by it.
    """
    table = read_table(args.input)
    where = parse_where(args.where)
    is_vqa = args.format == "vqa" or (args.format == "parquet" and (args.question_column or any(
        name in {c.lower() for c in table.columns} for name in DEFAULT_COLUMNS["question"])))
    image_of = None
    if writer is not None:
        column = pick_column(table.columns, args.image_column, "image", table.label)

        def image_of(row, number):
            return writer.save(row.get(column), f"row {number}")

    prefix = getattr(args, "image_prefix", "")
    if is_vqa:
        columns = {role: getattr(args, f"{role}_column") for role in VQA_ROLES}
        return vqa_records(table, columns, where, args.id_prefix, args.instruction, prefix, args.source,
                           args.answer_type, image_of)
    return (*caption_table_records(table, args.image_column, args.caption_column, args.id_column, where,
                                   args.caption_mode, args.prompt, args.id_prefix, args.source, prefix, image_of), None)


def _print_answer_type_reasons(reasons: list[dict], shown: int = 5) -> None:
    for reason in reasons[:shown]:
        kind = reason["answer_type"] if isinstance(reason["answer_type"], str) else "mixed"
        print(f"  {kind}: {reason['question'][:60]!r}: {reason['why']}")
    if len(reasons) > shown:
        print(f"  ... {len(reasons) - shown} more questions (all in --report, under answer_type_reasons)")


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    inputs = args.input if isinstance(args.input, list) else [args.input]
    check_output_path(args.out, inputs)
    check_output_path(args.report, [*inputs, args.out])
    extra, reasons = {}, None
    if args.format == "coco":
        records, skipped = coco_to_records(args.input, args.caption_mode, args.image_prefix, args.prompt,
                                           args.id_prefix, args.source)
    elif args.format == "imagefolder":
        records, skipped, classes = imagefolder_records(args.input, args.question, args.image_prefix,
                                                        args.id_prefix, args.source)
        extra = {"classes": classes}
        reasons = explain_answer_types(records, f"imagefolder: the answer is the image's class folder, one of "
                                                f"{len(classes)} classes")
        print(f"{len(classes)} classes: {', '.join(classes[:20])}" + (" ..." if len(classes) > 20 else ""))
    elif args.format == "parquet":
        writer = ImageWriter(args.image_folder, args.image_subdir.strip("/"))
        records, skipped, reasons = _table_records(args, writer)
        if writer.not_embedded:
            print(f"warning: {writer.not_embedded} rows reference image files instead of embedding them; "
                  "their paths are kept as they are")
        extra = writer.report()
    elif args.format == "preference":  # pairs have no answer type
        records, skipped, extra = convert_preference(args)
        reasons = []
    else:
        records, skipped, reasons = _table_records(args)
    if reasons is None:  # caption sets
        reasons = explain_answer_types(records, "captions are open")
    write_samples(args.out, records)
    answer_types = dict(sorted(Counter(r["answer_type"] for r in records if "answer_type" in r).items()))
    written = f"; {extra['images_written']} images written to {extra['image_dir']}" if "image_dir" in extra else ""
    print(f"{', '.join(inputs)} ({args.format}): wrote {len(records)} samples to {args.out}; skipped {len(skipped)}; "
          f"answer types {answer_types}{written}")
    for item in skipped[:10]:
        print(f"  skipped: {item}")
    _print_answer_type_reasons(reasons)
    write_report(args.report, {"format": args.format, "inputs": inputs, "out": args.out, "samples": len(records),
                               "answer_types": answer_types, "answer_type_reasons": reasons, "skipped": skipped,
                               **extra})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
