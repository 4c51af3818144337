"""Parquet / arrow tables with embedded images (as Hugging Face `datasets` writes them) -> LLaVA.

An image cell is a struct `{"bytes": ..., "path": ...}` (HF `Image` feature) or raw bytes. The
bytes are written unchanged (no re-encoding) under IMAGE_FOLDER/IMAGE_SUBDIR, named after the
original file name when there is one; identical images are written once and shared, and a name
already taken by different bytes gets the content hash appended. Rows with a question column
become VQA records (`convert.rows_to_vqa`), otherwise caption records.
"""
from __future__ import annotations

import hashlib
import io
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .convert import DEFAULT_COLUMNS, cell_text, caption_records, parse_where, pick_column, rows_to_vqa
from .io import DataToolError

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


def read_table(path: str) -> pa.Table:
    """A `.parquet` file, or an `.arrow` file in the IPC stream (HF `save_to_disk`) or file format."""
    if not os.path.isfile(path):
        raise DataToolError(f"{path}: file not found")
    if path.endswith(".parquet"):
        return pq.read_table(path)
    if path.endswith(".arrow"):
        with pa.memory_map(path) as source:
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    raise DataToolError(f"{path}: expected a .parquet or .arrow file")


class ImageWriter:
    """Writes embedded image bytes to files and returns their paths relative to the image folder."""

    def __init__(self, image_folder: str, subdir: str):
        self.image_folder, self.subdir = image_folder, subdir
        self.directory = os.path.join(image_folder, subdir)
        self.by_hash: dict[str, str] = {}  # sha256 -> relative path written in this run
        self.written = 0
        self.not_embedded = 0
        self.problems: list[dict] = []

    def _name(self, data: bytes, original: str | None, sha: str, where: str) -> str | None:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename((original or "").replace("\\", "/"))).lstrip(".")
        stem, suffix = os.path.splitext(base)
        if suffix.lower() not in IMAGE_SUFFIXES:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    suffix = EXTENSIONS.get(img.format, "." + (img.format or "img").lower())
            except Exception as err:
                self.problems.append({"where": where, "problem": f"embedded bytes are not an image ({err})"})
                return None
        return f"{stem or sha[:16]}{suffix}"

    def save(self, cell, where: str) -> str:
        """Relative path of the cell's image ('' when the row has none or it cannot be written)."""
        if cell is None:
            return ""
        if isinstance(cell, str):  # a path column, not an embedded image
            self.not_embedded += 1
            return cell
        data, original = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
        if not data:
            if original:
                self.not_embedded += 1
                return original
            return ""
        sha = hashlib.sha256(data).hexdigest()
        if sha in self.by_hash:
            return self.by_hash[sha]
        name = self._name(data, original, sha, where)
        if name is None:
            return ""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, name)
        if self._relative(name) in set(self.by_hash.values()) or (os.path.exists(path) and _read(path) != data):
            stem, suffix = os.path.splitext(name)
            name = f"{stem}-{sha[:12]}{suffix}"
            path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
            self.written += 1
        self.by_hash[sha] = self._relative(name)
        return self.by_hash[sha]

    def _relative(self, name: str) -> str:
        return f"{self.subdir}/{name}" if self.subdir else name


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _rows(tables):
    for _, table in tables:
        for batch in table.to_batches(max_chunksize=256):
            yield from batch.to_pylist()


def _captions(cell) -> list[str]:
    values = cell if isinstance(cell, list) else [cell]
    texts = []
    for value in values:
        if isinstance(value, dict):  # Karpathy-style {"raw": ...} / {"caption": ...}
            value = value.get("raw") or value.get("caption") or value.get("text")
        if cell_text(value):
            texts.append(cell_text(value))
    return texts


def convert_tables(paths: list[str], args) -> tuple[list[dict], list[dict], dict]:
    """Records, skipped rows and image-writing stats for `convert parquet` (all files as one table)."""
    tables = [(path, read_table(path)) for path in paths]
    columns = set(tables[0][1].schema.names)
    for path, table in tables[1:]:
        if set(table.schema.names) != columns:
            raise DataToolError(f"{path}: columns {sorted(table.schema.names)} differ from {paths[0]}'s "
                                f"{sorted(columns)}; expected shards of one table")
    label = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"
    writer = ImageWriter(args.image_folder, args.image_subdir.strip("/"))
    image_col = pick_column(columns, args.image_column, "image", label)

    def image_of(row, number):
        return writer.save(row.get(image_col), f"row {number}")

    has_question = args.question_column or any(name in columns for name in DEFAULT_COLUMNS["question"])
    if has_question:
        records, skipped = rows_to_vqa(_rows(tables), columns, label, args, image_of)
    else:
        caption_col = pick_column(columns, args.caption_column, "caption", label)
        id_col = pick_column(columns, args.id_column, "id", label, required=False)
        where = parse_where(args.where)
        records, skipped = [], []
        for number, row in enumerate(_rows(tables)):
            if any(cell_text(row.get(column)) != value for column, value in where):
                continue
            sid = f"{args.id_prefix}{cell_text(row.get(id_col)) if id_col else number}"
            captions = _captions(row.get(caption_col))
            image = image_of(row, number) if captions else ""
            if not captions or not image:
                skipped.append({"row": number, "id": sid, "reason": "empty caption" if not captions else "no image"})
                continue
            records += caption_records(sid, image, captions, args.caption_mode, args.prompt, args.source)
    if writer.not_embedded:
        print(f"warning: {writer.not_embedded} rows reference image files instead of embedding them; "
              "their paths are kept as they are")
    extra = {"image_dir": writer.directory, "images_written": writer.written, "distinct_images": len(writer.by_hash),
             "images_not_embedded": writer.not_embedded, "image_problems": writer.problems}
    return records, skipped, extra
