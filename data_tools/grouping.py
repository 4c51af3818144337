"""Which samples show the same picture, and so must stay in one split.

Samples are joined (union-find) when they share an image path, when two of their image files have
identical bytes, or when two files are near duplicates (see `data_tools.images`). A sample with
several images joins all of them; a text-only sample is a group on its own.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from .images import (DEFAULT_COLOR_THRESHOLD, DEFAULT_PHASH_THRESHOLD, Fingerprint, fingerprint_images,
                     near_duplicate_pairs)
from .io import DataToolError, ImagePathError, resolve_image_path, sample_id, sample_images


class UnionFind:
    """Disjoint sets over 0..n-1; the smallest index is a set's root, so results are deterministic."""

    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def sets(self) -> list[list[int]]:
        """All sets, each sorted, ordered by their smallest member."""
        members: dict[int, list[int]] = {}
        for item in range(len(self.parent)):
            members.setdefault(self.find(item), []).append(item)
        return list(members.values())


def image_keys(samples: list[dict], data_name: str = "data") -> list[list[str]]:
    """Each sample's image paths, normalized (`images/./a.png` == `images/a.png`)."""
    keys = []
    for index, sample in enumerate(samples):
        paths = sample_images(sample)
        for rel in paths:
            if not isinstance(rel, str) or not rel:
                raise DataToolError(f"{data_name}: sample {sample_id(sample, index)!r}: image path {rel!r} "
                                    "is not a non-empty string")
        keys.append([os.path.normpath(rel.replace("\\", "/")) for rel in paths])
    return keys


def add_image_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """--phash-threshold and --workers: how images are compared (partition and check_leakage)."""
    parser.add_argument("--phash-threshold", type=int, default=DEFAULT_PHASH_THRESHOLD,
                        help="max perceptual-hash distance of near duplicates, -1 = off "
                             f"(default {DEFAULT_PHASH_THRESHOLD})")
    parser.add_argument("--workers", type=int, help="threads reading images (default 2 x CPUs, at most 32)")


@dataclass
class ImageIndex:
    """Fingerprints of every image a sample set uses (keyed by normalized relative path)."""

    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    near_pairs: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def unreadable(self) -> dict[str, str]:
        return {path: fp.problem for path, fp in self.fingerprints.items() if fp.problem}


def index_images(keys_per_sample: list[list[str]], image_folder: str, allow_outside: bool = False,
                 phash_threshold: int = DEFAULT_PHASH_THRESHOLD, color_threshold: float = DEFAULT_COLOR_THRESHOLD,
                 workers: int | None = None, sample_names: list[str] | None = None) -> ImageIndex:
    """Fingerprint every distinct image under `image_folder` and find near-duplicate pairs."""
    resolved: dict[str, str] = {}
    for index, keys in enumerate(keys_per_sample):
        for key in keys:
            if key not in resolved:
                try:
                    resolved[key] = resolve_image_path(key, image_folder, allow_outside)
                except ImagePathError as err:
                    name = sample_names[index] if sample_names else f"#{index}"
                    raise DataToolError(f"sample {name}: {err}") from None
    by_path = fingerprint_images(list(resolved.values()), workers)
    fingerprints = {key: by_path[path] for key, path in resolved.items()}
    return ImageIndex(fingerprints, near_duplicate_pairs(fingerprints, phash_threshold, color_threshold))


def group_samples_by_image(keys_per_sample: list[list[str]], index: ImageIndex | None = None) -> list[list[int]]:
    """Groups of sample indices that must not be separated, ordered by their first sample.

    `keys_per_sample` comes from `image_keys`; with an `ImageIndex`, files with equal bytes and
    near-duplicate files join their samples' groups too.
    """
    sets = UnionFind(len(keys_per_sample))
    first_sample: dict[str, int] = {}  # image key -> first sample using it
    for sample, keys in enumerate(keys_per_sample):
        for key in keys:
            sets.union(first_sample.setdefault(key, sample), sample)
    if index is not None:
        first_with_content: dict[str, int] = {}
        for key, sample in first_sample.items():
            fingerprint = index.fingerprints.get(key)
            if fingerprint is not None and fingerprint.sha256 is not None:
                sets.union(first_with_content.setdefault(fingerprint.sha256, sample), sample)
        for a, b, _ in index.near_pairs:
            sets.union(first_sample[a], first_sample[b])
    return sets.sets()

