"""Reading LLaVA data files: one reader for training, evaluation and the data tools."""
from __future__ import annotations

import json


class DataFileError(ValueError):
    """A data file that cannot be read as LLaVA samples; the message names the file and the record."""


def load_samples(path: str) -> list[dict]:
    """Read LLaVA data: a JSON list of sample objects, or JSONL (one object per line).

    A `.jsonl` file is always read line by line (a one-line JSONL file is valid JSON too).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found; expected a LLaVA JSON or JSONL data file") from None
    data = None
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                # A list that does not parse is a broken JSON file, not JSONL: say where.
                raise DataFileError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} "
                                    f"({err.msg}); expected a JSON list of samples") from None
    if data is None:
        data = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataFileError(f"{path}: line {number} is not valid JSON ({err.msg}); "
                                        "expected a JSON list or JSONL (one sample per line)") from None
    if not isinstance(data, list):
        raise DataFileError(f"{path}: expected a JSON list of samples, found a JSON {type(data).__name__}")
    for index, sample in enumerate(data):
        if not isinstance(sample, dict):
            raise DataFileError(f"{path}: record {index} is a {type(sample).__name__}; "
                                "expected an object with 'id' and 'conversations'")
    return data


def sample_id(sample: dict, index: int) -> str:
    """The name used for a sample in messages: its `id`, or `#<index>` when it has none."""
    value = sample.get("id")
    return f"#{index}" if value is None else str(value)


def sample_images(sample: dict) -> list[str]:
    """The sample's image paths as a list (`image` may be absent, one path, or a list)."""
    image = sample.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]
