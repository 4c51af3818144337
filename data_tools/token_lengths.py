"""Token lengths exactly as training computes them (`llava_tiny.checks.check_length`).

Used by `validate` (which samples `--model-max-length` would truncate) and `stats` (histograms).
Large sets are measured in forked worker processes: tokenizing is the slow part of validating
100k samples, and a fork shares the loaded tokenizer with the workers without pickling it.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field

from llava_tiny.checks import check_length

from .io import DataToolError, sample_id

PARALLEL_MIN_SAMPLES = 4000  # below this, starting workers costs more than it saves
CHUNK = 1000


def load_tokenizer(path: str, template: str):
    """`AutoTokenizer.from_pretrained(path)` with `<image>` and the template's special tokens added."""
    from transformers import AutoTokenizer

    from llava_tiny.conversation import get_template, prepare_tokenizer

    try:
        get_template(template)  # an unknown name fails here, before the slow tokenizer load
    except ValueError as err:
        raise DataToolError(f"--version: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise DataToolError(f"--tokenizer {path}: cannot load a tokenizer ({err})") from None
    prepare_tokenizer(tokenizer, template)
    return tokenizer


@dataclass
class TokenLengths:
    lengths: dict[int, int] = field(default_factory=dict)  # sample index -> full length (no truncation)
    dropped_turns: dict[int, int] = field(default_factory=dict)  # truncated samples -> answer turns dropped
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (kind, message)


_JOB: tuple | None = None  # the work shared with forked workers


def _measure(indices: list[int]) -> list[tuple]:
    samples, tokenizer, template, num_image_tokens, model_max_length = _JOB
    results = []
    for index in indices:
        checked = check_length(samples[index], sample_id(samples[index], index), tokenizer, template,
                               num_image_tokens, model_max_length)
        kind, message = checked.problem or (None, None)
        results.append((index, checked.length, checked.dropped_turns, kind, message))
    return results


def measure_token_lengths(samples: list[dict], indices: list[int], tokenizer, template: str = "llava_v1",
                          num_image_tokens: int = 576, model_max_length: int | None = None,
                          workers: int | None = None) -> TokenLengths:
    """Token length of each sample in `indices` and what `model_max_length` would do to it.

    `problems` holds samples `tokenize_conversation` rejects: `too_long` when not even the first
    answer fits, `bad_conversations` for a malformed conversation.
    """
    global _JOB
    workers = workers or os.cpu_count() or 1
    chunks = [indices[i:i + CHUNK] for i in range(0, len(indices), CHUNK)]
    _JOB = (samples, tokenizer, template, num_image_tokens, model_max_length)
    try:
        if workers > 1 and len(indices) >= PARALLEL_MIN_SAMPLES and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(min(workers, len(chunks))) as pool:
                parts = pool.map(_measure, chunks)
        else:
            parts = [_measure(chunk) for chunk in chunks]
    finally:
        _JOB = None
    result = TokenLengths()
    for part in parts:
        for index, length, dropped, kind, message in part:
            if length is not None:
                result.lengths[index] = length
            if dropped:
                result.dropped_turns[index] = dropped
            if kind:
                result.problems[index] = (kind, message)
    return result


def length_summary(lengths) -> dict:
    """min / mean / median / p95 / max of a list of lengths (None values when empty)."""
    ordered = sorted(lengths)
    if not ordered:
        return {"count": 0, "min": None, "mean": None, "median": None, "p95": None, "max": None}
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"count": len(ordered), "min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1),
            "median": median, "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}
