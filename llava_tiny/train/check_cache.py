"""The check before training, remembered: a warm start reads what the last start found instead of checking
665k records again.

What is kept (`CheckResult`): each record's byte range in the data file, its id, its length for the
length-grouped sampler, the problems found (sample id -> message) and the warnings said at start. It is
used only when everything that shapes it is unchanged (`check_key`): the data file (path, size,
mtime, inode), the tokenizer (its serialised spec, special tokens and chat template), the template,
image token count, `model_max_length`, image folder and settings, the dataset kind, and the code of the
checks themselves; and every image the data names still has the size and mtime it had (or is still
missing): a deleted or replaced image is found again.

The file sits next to the data (`.llava_tiny_cache/`), or under `$XDG_CACHE_HOME/llava_tiny` when that
folder is read-only, or where `--data_cache_dir` says ("none" turns it off). Writing is atomic
(a temporary file, then a rename) and a cache that cannot be written or read is passed over quietly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from array import array
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

VERSION = 1
# Modules whose code decides what the check finds: a changed rule re-checks.
_RULE_MODULES = ("llava_tiny.checks", "llava_tiny.conversation", "llava_tiny.templates", "llava_tiny.token_bounds",
                 "llava_tiny.data", "llava_tiny.preference", "llava_tiny.images", "llava_tiny.train.dataset",
                 "llava_tiny.train.preference_dataset")


@dataclass
class CheckResult:
    """What the check of one data file found; lists are in the file's order, one entry per record."""

    starts: array = field(default_factory=lambda: array("q"))
    ends: array = field(default_factory=lambda: array("q"))
    ids: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # first problem per unusable sample, file order
    images: dict[str, list | None] = field(default_factory=dict)  # image path -> [size, mtime_ns], None: missing
    texts: int = 0  # records with a formatted `text`
    repeated: list[list] = field(default_factory=list)  # [kind, count] of repeated records
    repeated_examples: list[str] = field(default_factory=list)


def image_state(path: str) -> list | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, str(tokenizer.special_tokens_map), tokenizer.bos_token_id,
                        tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.blake2b((spec + extra).encode(), digest_size=16).hexdigest()


def _rules_digest() -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in _RULE_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            with open(module.__file__, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def check_key(data_path: str, tokenizer, settings: dict) -> dict:
    """Everything the check's result depends on (besides the images, compared one by one on load)."""
    stat = os.stat(data_path)
    return {"version": VERSION, "data": [os.path.realpath(data_path), stat.st_size, stat.st_mtime_ns, stat.st_ino],
            "tokenizer": _tokenizer_digest(tokenizer), "rules": _rules_digest(),
            **{name: str(value) for name, value in sorted(settings.items())}}


def cache_file(data_path: str, cache_dir: str | None) -> str | None:
    """Where the cache of `data_path` is kept (None: no writable place, or turned off with "none")."""
    if cache_dir is not None and cache_dir.lower() in ("none", ""):
        return None
    real = os.path.realpath(data_path)
    name = f"{os.path.basename(real)}.{hashlib.blake2b(real.encode(), digest_size=6).hexdigest()}.check.json"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates = [cache_dir] if cache_dir else [os.path.join(os.path.dirname(real), ".llava_tiny_cache"),
                                                 os.path.join(xdg, "llava_tiny", "data")]
    for folder in candidates:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return os.path.join(folder, name)
    return None


def load(path: str | None, key: dict) -> CheckResult | None:
    """The cached result for `key`, or None (no cache, another key, an image changed, unreadable)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("key") != key:
            return None
        stale = next((p for p, state in saved["images"].items() if image_state(p) != state), None)
        if stale is not None:
            logger.info("%s: image %s changed since the last check; checking again", key["data"][0], stale)
            return None
        return CheckResult(array("q", saved["starts"]), array("q", saved["ends"]), saved["ids"], saved["lengths"],
                           dict(saved["problems"]), saved["images"], saved["texts"], saved["repeated"],
                           saved["repeated_examples"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.info("cache %s not used (%s); checking the data", path, err)
        return None


def save(path: str | None, key: dict, result: CheckResult) -> None:
    """Write atomically; a place that cannot be written is passed over (the next start checks again)."""
    if path is None:
        return
    saved = {"key": key, "starts": result.starts.tolist(), "ends": result.ends.tolist(), "ids": result.ids,
             "lengths": result.lengths, "problems": list(result.problems.items()), "images": result.images,
             "texts": result.texts, "repeated": result.repeated, "repeated_examples": result.repeated_examples}
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(saved, f, separators=(",", ":"))
        os.replace(temporary, path)
    except OSError as err:
        logger.info("cannot write the check's cache %s (%s); the next start checks again", path, err)
        try:
            os.remove(temporary)
        except OSError:
            pass
