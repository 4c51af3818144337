"""Image fingerprints shared by partition and check_leakage (the image checks are `llava_tiny.checks`).

Each distinct image file is opened once, in a thread pool (Pillow releases the GIL while it
decodes). Two files show "the same picture" when their bytes are equal (SHA-256) or when they are
near duplicates: perceptual hashes (imagehash `phash`, 64 bits) within a small Hamming distance
*and* 16x16 colour thumbnails that agree, on average and in every cell. The thumbnail check
matters because `phash` looks at coarse grey levels only: a red square and a green square at the
same place, a circle and a triangle at the same place, or two plain images of any colours, have
(nearly) the same phash but are different pictures. A copy re-encoded as JPEG (quality 70+) stays
within all three thresholds (measured: mean cell difference <= 4.8, largest <= 51).
"""
from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from llava_tiny.images import to_rgb

DEFAULT_PHASH_THRESHOLD = 4  # bits out of 64; JPEG quality-90 copies differ by 0-4
DEFAULT_COLOR_THRESHOLD = 5.0  # mean absolute difference of 16x16 RGB thumbnails, 0-255 scale
MAX_CELL_DIFFERENCE = 64  # largest difference of one thumbnail value: a changed object exceeds it
THUMBNAIL_SIZE = 16
# Big images are decoded at a reduced scale (JPEG draft mode): hashes only need a small image.
FINGERPRINT_DECODE_SIZE = (256, 256)


def default_workers() -> int:
    return min(32, 2 * (os.cpu_count() or 1))


def _parallel_map(function, items: list, workers: int | None) -> list:
    workers = workers or default_workers()
    if workers <= 1 or len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items, chunksize=1))


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a picture: file hash, perceptual hash and a small colour thumbnail."""

    sha256: str | None  # None when the file cannot be read
    phash: int | None  # None when the image cannot be decoded
    thumbnail: bytes | None  # THUMBNAIL_SIZE^2 RGB bytes
    problem: str | None = None


def fingerprint_image(path: str) -> Fingerprint:
    """SHA-256 of the file, 64-bit phash and colour thumbnail of the decoded image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return Fingerprint(None, None, None, "not found" if isinstance(err, FileNotFoundError) else str(err))
    sha = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", FINGERPRINT_DECODE_SIZE)
            img.load()
            rgb = to_rgb(img)  # transparent pixels as training sees them, not the colour stored under them
    except Exception as err:
        return Fingerprint(sha, None, None, f"cannot be decoded ({type(err).__name__}: {err})")
    phash = int(str(imagehash.phash(rgb)), 16)
    thumbnail = rgb.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.BOX).tobytes()
    return Fingerprint(sha, phash, thumbnail)


def fingerprint_images(paths, workers: int | None = None) -> dict[str, Fingerprint]:
    """Fingerprints of each distinct path, computed in parallel."""
    unique = list(dict.fromkeys(paths))
    return dict(zip(unique, _parallel_map(fingerprint_image, unique, workers)))


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return np.unpackbits(values.view(np.uint8).reshape(*values.shape, 8), axis=-1).sum(axis=-1)


def near_duplicate_pairs(fingerprints: dict[str, Fingerprint], phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
                         color_threshold: float = DEFAULT_COLOR_THRESHOLD) -> list[tuple[str, str, int]]:
    """(path_a, path_b, phash distance) for near-duplicate images with different bytes.

    Files with equal bytes are compared once (the first path stands for all of them). All pairs
    of phashes are compared with numpy in blocks: exact and simple, ~8 s for 50k distinct images.
    A negative `phash_threshold` turns near-duplicate detection off.
    """
    if phash_threshold < 0:
        return []
    first_of_content: dict[str, str] = {}
    for path, fp in fingerprints.items():
        if fp.phash is not None:
            first_of_content.setdefault(fp.sha256, path)
    paths = list(first_of_content.values())
    if len(paths) < 2:
        return []
    hashes = np.array([fingerprints[p].phash for p in paths], dtype=np.uint64)
    thumbs = np.stack([np.frombuffer(fingerprints[p].thumbnail, dtype=np.uint8) for p in paths]).astype(np.int16)
    pairs = []
    block = max(1, (1 << 22) // len(paths))  # rows per step: ~4M comparisons, ~40 MB
    for start in range(0, len(paths), block):
        rows = hashes[start:start + block]
        distance = _popcount(rows[:, None] ^ hashes[None, start:])
        # Keep the upper triangle only (each pair once, no self pairs).
        distance[np.tril_indices(len(rows), 0, distance.shape[1])] = 255
        rows_i, cols_j = np.nonzero(distance <= phash_threshold)
        for chunk in range(0, len(rows_i), 1 << 16):  # candidates are checked in batches
            a = start + rows_i[chunk:chunk + (1 << 16)]
            b = start + cols_j[chunk:chunk + (1 << 16)]
            difference = np.abs(thumbs[a] - thumbs[b])
            close = (difference.mean(axis=1) <= color_threshold) & (difference.max(axis=1) <= MAX_CELL_DIFFERENCE)
            for x, y in zip(a[close], b[close]):
                pairs.append((paths[x], paths[y], int(distance[x - start, y - start])))
    return pairs
