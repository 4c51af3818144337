"""`python -m data_tools.convert preference`: preference tables (RLAIF-V style: `image`, `question`,
`chosen`, `rejected`) -> the preference records DPO trains on (`llava_tiny/data.py`, LLaVA-NeXT form):

    {"id", "image", "prompt": "<image>\\n<question>", "chosen", "rejected", ...the row's other columns}

    python -m data_tools.convert preference --input RLAIF-V-Dataset_000.parquet --out pairs.json \\
        --image-folder data/images --image-subdir rlaifv

Images embedded in parquet/arrow cells are written once each under IMAGE_FOLDER/IMAGE_SUBDIR (as
`convert parquet`); a column of paths is kept (joined to --image-prefix). A row without an image
gives a text-only pair. Rows with an empty question or answer, or the same chosen and rejected
answer, are skipped and listed in the report.
"""
from __future__ import annotations

import posixpath

from llava_tiny.conversation import IMAGE_TOKEN

from .converters import _check_unique_ids, _kept_rows
from .embedded_images import ImageWriter
from .records import extra_fields
from .tables import cell_text, parse_where, pick_column, read_table

PAIR_ROLES = ("question", "chosen", "rejected")


def add_preference_parser(formats, parents) -> None:
    """Register the `preference` subcommand (`parents`: convert's shared --out/--id-prefix/--where/... options)."""
    parser = formats.add_parser("preference", parents=parents,
                                help="preference table (image, question, chosen, rejected): CSV, JSON, JSONL, parquet "
                                     "or arrow -> DPO pairs")
    parser.add_argument("--input", required=True, nargs="+", help="one table, or shards of one table")
    for role in PAIR_ROLES:
        parser.add_argument(f"--{role}-column", dest=f"{role}_column", help=f"column with the {role} (default {role!r})")
    parser.add_argument("--image-folder", help="with embedded images (parquet/arrow): the folder training gets as "
                                               "--image_folder; images are written under IMAGE_FOLDER/IMAGE_SUBDIR")
    parser.add_argument("--image-subdir", default="images", help="see --image-folder (default images)")


def preference_records(table, columns: dict[str, str | None], where=(), id_prefix: str = "", image_prefix: str = "",
                       source: str | None = None, image_of=None) -> tuple[list[dict], list[dict]]:
    """Preference records from a table's rows, and the rows skipped. `image_of(row, number)` gives a row's image
    path (embedded images are written by it); without it the image column holds the path."""
    label = table.label
    pick = {role: pick_column(table.columns, columns.get(role) or role, role, label) for role in PAIR_ROLES}
    pick["image"] = pick_column(table.columns, columns.get("image"), "image", label, required=False)
    pick["id"] = pick_column(table.columns, columns.get("id"), "id", label, required=False)
    records, skipped = [], []
    for number, sid, row in _kept_rows(table, where, pick["id"], id_prefix):
        texts = {role: cell_text(row.get(pick[role])) for role in PAIR_ROLES}
        empty = [role for role, text in texts.items() if not text]
        if empty or texts["chosen"] == texts["rejected"]:
            why = f"empty {' and '.join(empty)}" if empty else "chosen and rejected are the same answer"
            skipped.append({"row": number, "id": sid, "reason": why})
            continue
        image = None
        if pick["image"] and row.get(pick["image"]) is not None:
            image = image_of(row, number) if image_of else cell_text(row.get(pick["image"])) or None
            if image and not image_of and image_prefix:
                image = posixpath.join(image_prefix, image)
        question = texts["question"].replace(IMAGE_TOKEN, "").strip()
        record = {"id": sid, **({"image": image} if image else {}),
                  "prompt": f"{IMAGE_TOKEN}\n{question}" if image else question,
                  "chosen": texts["chosen"], "rejected": texts["rejected"], **({"source": source} if source else {})}
        records.append({**record, **extra_fields(row, [*pick.values(), *record])})
    _check_unique_ids(records, label)
    return records, skipped


def convert_preference(args) -> tuple[list[dict], list[dict], dict]:
    """The `preference` subcommand: (records, skipped rows, report fields)."""
    table = read_table(args.input)
    writer = ImageWriter(args.image_folder, args.image_subdir.strip("/")) if args.image_folder else None
    column = pick_column(table.columns, args.image_column, "image", table.label, required=False)

    def image_of(row, number):
        return writer.save(row.get(column), f"row {number}")

    columns = {role: getattr(args, f"{role}_column") for role in PAIR_ROLES}
    columns.update(image=args.image_column, id=args.id_column)
    records, skipped = preference_records(table, columns, parse_where(args.where), args.id_prefix, args.image_prefix,
                                          args.source, image_of if writer else None)
    return records, skipped, writer.report() if writer else {}
