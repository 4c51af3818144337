"""Reading the tables `data_tools.convert` starts from: CSV, JSON, JSONL, parquet and arrow.

One reader for every converter, so a column is found the same way everywhere: by the name the user
gives (`--question-column Frage`) or the first of a list of usual names, case-insensitively
(`Question` is `question`), and rows are filtered by `--where COLUMN=VALUE` the same way.
"""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .io import DataToolError

# Column names tried in order when no --*-column flag is given (VQA-RAD, SLAKE, PathVQA, HF sets).
DEFAULT_COLUMNS = {
    "image": ("image", "image_name", "img_name", "image_path", "img_path", "file_name", "filename", "image_id",
              "img_id"),
    "question": ("question", "sent", "query"),
    "answer": ("answer", "answers", "label"),
    "answer_type": ("answer_type",),
    "question_type": ("question_type",),
    "id": ("qid", "question_id", "id"),
    "caption": ("caption", "captions", "sentences", "text"),
}
TEXT_SUFFIXES = (".csv", ".json", ".jsonl")
ARROW_SUFFIXES = (".parquet", ".arrow")


@dataclass
class Table:
    """Rows of one or more files with the same columns (shards of one table)."""

    label: str  # how messages name it: the file, or "first (+N files)"
    columns: list[str]
    batches: list  # lists of row dicts, or pyarrow tables (read lazily, in batches)

    def rows(self) -> Iterator[dict]:
        for batch in self.batches:
            if isinstance(batch, list):
                yield from batch
            else:
                for record_batch in batch.to_batches(max_chunksize=256):
                    yield from record_batch.to_pylist()


def _read_text_rows(path: str) -> list[dict]:
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
        raise DataToolError(f"{path}: expected a list of objects (one per row)")
    return rows


def _read_arrow(path: str):
    """A `.parquet` file, or an `.arrow` file in the IPC stream (HF `save_to_disk`) or file format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path)
    with pa.memory_map(path) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def read_table(paths: list[str]) -> Table:
    """The rows of `paths` (CSV with a header line, a JSON list of objects, JSONL, parquet or arrow) as one table.

    Several files must have the same columns (shards of one table).
    """
    batches, columns = [], None
    for path in paths:
        if not os.path.isfile(path):
            raise DataToolError(f"{path}: file not found")
        if path.lower().endswith(ARROW_SUFFIXES):
            batch = _read_arrow(path)
            names = list(batch.schema.names)
        elif path.lower().endswith(TEXT_SUFFIXES):
            batch = _read_text_rows(path)
            names = list(dict.fromkeys(key for row in batch for key in row))
        else:
            raise DataToolError(f"{path}: expected a {', '.join(TEXT_SUFFIXES + ARROW_SUFFIXES)} file")
        if columns is not None and set(names) != set(columns):
            raise DataToolError(f"{path}: columns {sorted(names)} differ from {paths[0]}'s {sorted(columns)}; "
                                "expected shards of one table")
        columns = names if columns is None else columns
        batches.append(batch)
    label = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"
    return Table(label, columns or [], batches)


def pick_column(columns: Iterable[str], wanted: str | None, role: str, label: str,
                required: bool = True) -> str | None:
    """The column for `role`: `wanted` when given (must exist), else the first default present.

    Names match case-insensitively; the table's own spelling is returned. `wanted` "none" means
    "do not use such a column".
    """
    by_lower: dict[str, str] = {}
    for name in columns:
        by_lower.setdefault(name.lower(), name)
    if wanted is not None:
        if wanted.lower() == "none":
            return None
        if wanted.lower() not in by_lower:
            raise DataToolError(f"{label}: no column {wanted!r} for the {role.replace('_', ' ')}; "
                                f"columns are {sorted(by_lower.values())}")
        return by_lower[wanted.lower()]
    for name in DEFAULT_COLUMNS[role]:
        if name in by_lower:
            return by_lower[name]
    if required:
        raise DataToolError(f"{label}: no {role.replace('_', ' ')} column (tried {', '.join(DEFAULT_COLUMNS[role])}); "
                            f"columns are {sorted(by_lower.values())}; name it with --{role.replace('_', '-')}-column")
    return None


def parse_where(conditions: Iterable[str] | None) -> list[tuple[str, str]]:
    """`--where COLUMN=VALUE ...` as (column, value) pairs."""
    pairs = []
    for condition in conditions or ():
        column, sep, value = condition.partition("=")
        if not sep or not column:
            raise DataToolError(f"--where {condition!r}: expected COLUMN=VALUE")
        pairs.append((column, value))
    return pairs


def row_filter(columns: Iterable[str], where: list[tuple[str, str]], label: str):
    """A predicate keeping the rows that match every (column, value) of `where` (columns matched as in `pick_column`)."""
    by_lower = {name.lower(): name for name in columns}
    for column, _ in where:
        if column.lower() not in by_lower:
            raise DataToolError(f"{label}: --where {column}=...: no column {column!r}; columns are {sorted(columns)}")
    resolved = [(by_lower[column.lower()], value) for column, value in where]
    return lambda row: all(cell_text(row.get(column)) == value for column, value in resolved)


def cell_text(value) -> str:
    """A table cell as stripped text ('' for None)."""
    if value is None:
        return ""
    return str(value).strip()
