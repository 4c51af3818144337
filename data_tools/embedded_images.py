"""Images embedded in table cells (as Hugging Face `datasets` writes them) -> files in the image folder.

An image cell is a struct `{"bytes": ..., "path": ...}` (HF `Image` feature) or raw bytes. The
bytes are written unchanged (no re-encoding) under IMAGE_FOLDER/IMAGE_SUBDIR, named after the
original file name when there is one; identical images are written once and shared, and a name
already taken by different bytes gets the content hash appended.
"""
from __future__ import annotations

import hashlib
import io
import os
import re

from PIL import Image

EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


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

    def report(self) -> dict:
        """What the converter's report says about the images written."""
        return {"image_dir": self.directory, "images_written": self.written, "distinct_images": len(self.by_hash),
                "images_not_embedded": self.not_embedded, "image_problems": self.problems}

    def _relative(self, name: str) -> str:
        return f"{self.subdir}/{name}" if self.subdir else name


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()

