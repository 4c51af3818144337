"""Audit train/val/test files for the same picture in more than one split.

    python -m data_tools.check_leakage data/sets/data_train.json data/sets/data_val.json \\
        data/sets/data_test.json --image-folder data/imagenes

Three kinds of leak are counted: the same image file used by samples of two splits; one picture
stored under several names (identical bytes) whose files are used in two splits, counted once per
picture; and near-duplicate pairs (a re-encoded or slightly changed copy; perceptual hash +
colour thumbnail, see `data_tools.images`). Exit code 1 when any leak is found, 0 when clean.
"""
from __future__ import annotations

import argparse
import os

from .grouping import ImageIndex, add_image_comparison_arguments, image_keys, index_images
from .images import DEFAULT_COLOR_THRESHOLD, DEFAULT_PHASH_THRESHOLD
from .io import (add_allow_outside_argument, add_report_argument, check_output_path, cli_errors, load_samples,
                 sample_id, write_report)

MAX_EXAMPLES = 20


def _first_ids(split_keys, split_ids) -> dict[str, dict[str, str]]:
    """image key -> {split name: first sample id using it}."""
    users: dict[str, dict[str, str]] = {}
    for name, keys_per_sample in split_keys.items():
        for keys, sid in zip(keys_per_sample, split_ids[name]):
            for key in keys:
                users.setdefault(key, {}).setdefault(name, sid)
    return users


def _cross(users_a: dict[str, str], users_b: dict[str, str]) -> tuple[str, str] | None:
    """A pair of different splits, one using image a and one using image b, if there is one."""
    for split_a in users_a:
        for split_b in users_b:
            if split_a != split_b:
                return split_a, split_b
    return None


def audit_splits(split_keys: dict[str, list[list[str]]], split_ids: dict[str, list[str]],
                 index: ImageIndex | None = None) -> dict:
    """Count images shared across splits: same file, same bytes, near duplicates (with examples).

    `split_keys[name]` holds each sample's image keys (`grouping.image_keys`), `split_ids[name]`
    the sample ids; without an `index` only shared file paths are checked.
    """
    users = _first_ids(split_keys, split_ids)
    same_file = []
    for key, splits in users.items():
        if len(splits) > 1:
            same_file.append({"images": [key], "splits": list(splits), "samples": list(splits.values())})
    same_bytes, near = [], []
    if index is not None:
        by_hash: dict[str, list[str]] = {}
        for key in users:
            fingerprint = index.fingerprints.get(key)
            if fingerprint is not None and fingerprint.sha256 is not None:
                by_hash.setdefault(fingerprint.sha256, []).append(key)
        # Splits using each picture, over all the names it is stored under.
        by_content: dict[str, dict[str, str]] = {}
        for sha, keys in by_hash.items():
            for key in keys:
                for split, sid in users[key].items():
                    by_content.setdefault(sha, {}).setdefault(split, sid)
            if len(keys) > 1 and len(by_content[sha]) > 1:  # several names and several splits
                same_bytes.append({"images": keys[:MAX_EXAMPLES], "splits": list(by_content[sha]),
                                   "samples": list(by_content[sha].values())})

        def content_users(key):
            fingerprint = index.fingerprints.get(key)
            return by_content.get(fingerprint.sha256) if fingerprint is not None else None

        # A near-duplicate pair stands for every file with the same bytes as either side.
        for a, b, distance in index.near_pairs:
            if content_users(a) and content_users(b):
                pair = _cross(content_users(a), content_users(b))
                if pair:
                    near.append({"images": [a, b], "phash_distance": distance, "splits": list(pair),
                                 "samples": [content_users(a)[pair[0]], content_users(b)[pair[1]]]})
    images_per_split = {name: len({k for keys in per_sample for k in keys}) for name, per_sample in split_keys.items()}
    return {
        "splits": {name: {"samples": len(split_ids[name]), "images": images_per_split[name]} for name in split_keys},
        "content_checked": index is not None,
        "shared_image_files": len(same_file),
        "exact_duplicates_across_splits": len(same_bytes),
        "near_duplicates_across_splits": len(near),
        # Pictures in more than one split, all kinds together (what `--leakage` readers look at).
        "shared_images": len(same_file) + len(same_bytes) + len(near),
        "unreadable_images": dict(sorted(index.unreadable.items())) if index is not None else {},
        "examples": {"shared_image_files": same_file[:MAX_EXAMPLES],
                     "exact_duplicates": same_bytes[:MAX_EXAMPLES], "near_duplicates": near[:MAX_EXAMPLES]},
    }


def find_leakage(split_files: list[str], image_folder: str | None, phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
                 color_threshold: float = DEFAULT_COLOR_THRESHOLD, workers: int | None = None,
                 allow_outside: bool = False) -> dict:
    """Audit split files made anywhere; content checks need `image_folder`."""
    split_keys, split_ids = {}, {}
    for path in split_files:
        name = os.path.basename(path)
        if name in split_keys:
            name = path
        samples = load_samples(path)
        split_keys[name] = image_keys(samples, path)
        split_ids[name] = [sample_id(s, i) for i, s in enumerate(samples)]
    index = None
    if image_folder is not None:
        all_keys = [keys for per_split in split_keys.values() for keys in per_split]
        names = [f"{sid!r} in {split}" for split, ids in split_ids.items() for sid in ids]
        index = index_images(all_keys, image_folder, allow_outside, phash_threshold, color_threshold, workers, names)
    return audit_splits(split_keys, split_ids, index)


def print_leakage(report: dict) -> None:
    """Human summary of an `audit_splits` report."""
    for name, counts in report["splits"].items():
        print(f"  {name}: {counts['samples']} samples, {counts['images']} images")
    checked = "" if report["content_checked"] else " (file paths only: pass --image-folder to compare contents)"
    print(f"  shared image files: {report['shared_image_files']}, identical files under other names: "
          f"{report['exact_duplicates_across_splits']}, near duplicates: {report['near_duplicates_across_splits']}"
          + checked)
    for kind, examples in report["examples"].items():
        for example in examples[:5]:
            print(f"  leak ({kind}): {' ~ '.join(example['images'])} in {' and '.join(example['splits'])} "
                  f"(samples {', '.join(map(repr, example['samples']))})")
    if report["unreadable_images"]:
        print(f"  warning: {len(report['unreadable_images'])} images could not be read; compared by path only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.check_leakage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("splits", nargs="+", help="split files (LLaVA JSON/JSONL), e.g. train val test")
    parser.add_argument("--image-folder", help="folder the image paths are relative to (needed for content checks)")
    add_image_comparison_arguments(parser)
    add_allow_outside_argument(parser)
    add_report_argument(parser)
    return parser


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_output_path(args.report, args.splits)
    report = find_leakage(args.splits, args.image_folder, args.phash_threshold, workers=args.workers,
                          allow_outside=args.allow_images_outside_folder)
    print(f"leakage check of {len(args.splits)} split files: {'LEAKS FOUND' if report['shared_images'] else 'clean'}")
    print_leakage(report)
    write_report(args.report, report)
    return 1 if report["shared_images"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
