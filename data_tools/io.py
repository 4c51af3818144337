"""Reading and writing LLaVA data files: the part every data tool shares.

The rules here are the ones training uses: a data file is a JSON list of samples or JSONL (one
sample per line); a sample without an `id` is named `#<index>`; image paths are relative to the
image folder and may not escape it (same `resolve_image_path` as `llava_tiny.train.dataset`).
Tools never modify their input: `check_output_path` refuses an output that is one of the inputs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from llava_tiny.data import DataFileError, load_samples, sample_id, sample_images  # noqa: F401 (re-exported)
from llava_tiny.images import ImagePathError, resolve_image_path

__all__ = [
    "DataToolError", "ImagePathError", "resolve_image_path", "image_path_resolver", "load_samples", "sample_id",
    "sample_images",
    "write_json", "write_samples", "check_output_path", "add_report_argument", "add_allow_outside_argument",
    "write_report", "cli_errors",
]


class DataToolError(DataFileError):
    """Bad input or arguments; the message names the file (and sample) and what was expected."""


def image_path_resolver(image_folder: str, allow_outside: bool = False):
    """`resolve_image_path` for one folder, cached: a dataset uses each image for many samples."""
    return functools.lru_cache(maxsize=None)(
        lambda relative: resolve_image_path(relative, image_folder, allow_outside))


def write_json(path: str, data) -> None:
    """Write `data` as UTF-8 JSON (indent 2, key order kept) so equal data gives equal bytes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_samples(path: str, samples: list[dict]) -> None:
    """Write samples as a JSON list, or as JSONL when `path` ends with `.jsonl`."""
    if not path.endswith(".jsonl"):
        write_json(path, samples)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(output: str | None, inputs: list[str]) -> None:
    """Refuse to write `output` when it is one of `inputs` (tools never modify their input)."""
    if output is None:
        return
    for source in inputs:
        if source is not None and _same_file(output, source):
            raise DataToolError(f"refusing to write {output}: it is an input of this command "
                                f"({source}); choose another output path")


def add_report_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", metavar="FILE", help="also write the full report as JSON to FILE")


def add_allow_outside_argument(parser: argparse.ArgumentParser) -> None:
    # The underscore spelling is training's flag, which the project's path error message names.
    parser.add_argument("--allow-images-outside-folder", "--allow_images_outside_folder", action="store_true",
                        dest="allow_images_outside_folder",
                        help="accept image paths that are absolute or contain ../ and leave the image folder")


def write_report(path: str | None, report: dict) -> None:
    """Write the JSON report when `--report` was given."""
    if path:
        write_json(path, report)
        print(f"report written to {path}")


def cli_errors(main):
    """Turn `DataToolError`/`DataFileError`/`ImagePathError` into `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except (DataFileError, ImagePathError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper
