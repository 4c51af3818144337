"""The rules a sample must meet, as lists of problems: one definition for every user (every format
`llava_tiny.data` reads).

Training raises on them (`train.dataset.LazySupervisedDataset`), `data_tools.validate` reports them
all, `eval.generate`, `inference.build_prompt` and the server reuse them. The conversation rules
live with the code that tokenizes (`conversation.turn_problems`, `conversation.marker_problem`,
`conversation.SampleTooLongError`); this module applies them to records and adds the image rules:

    conversation shape and turns   turn_problems          bad_conversations, bad_roles, empty_turn, image_in_answer
    a `messages` record's form     data.read_messages     bad_conversations, bad_roles (in the file's own words)
    a formatted `text` record      record_problems        bad_conversations (no text)
    `image` field                  record_problems        bad_image_field
    one `<image>` marker per image record_problems        image_marker_mismatch
    image path inside the folder   image_path_problems    image_outside_folder (warning: absolute_image_path)
    image exists and decodes       inspect_image          missing_image, corrupt_image (warning: transparent_image)
    fits model_max_length          check_length           too_long (warning: truncated, in data_tools.validate)
    preference pairs (DPO)         preference_problems    no_prompt, missing_chosen, missing_rejected, identical_answers,
                                                          image_in_answer, image_marker_mismatch (llava_tiny/preference.py)
    a record repeated              duplicate_problems     warnings duplicate_id, duplicate_sample (training uses every
                                                          record as often as it appears; both say so)
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from .conversation import (IMAGE_TOKEN, ConversationError, SampleTooLongError, marker_problem, tokenize_sample,
                           turn_problems)
from .data import is_preference_record, read_messages, record_format, sample_id, sample_images
from .images import ImagePathError, has_alpha, resolve_image_path
from .preference import preference_problems, tokenize_preference
from .token_bounds import first_turn_upper_bound

WARNING_KINDS = ("absolute_image_path", "transparent_image", "truncated", "duplicate_id", "duplicate_sample")
# What makes two records the same sample, besides their images and `conversations`.
CONTENT_FIELDS = ("prompt", "messages", "chosen", "rejected", "text", "system")
IMAGE_CHECKS = (None, "header", "full")
MISSING_HINT_LIMIT = 20  # missing images that get a "found at ..." search: they usually share one cause


@dataclass(frozen=True)
class Problem:
    """One broken rule of one record: `message` says what is wrong and what was expected."""

    index: int  # record position in the file
    sample_id: str
    kind: str
    message: str
    file: str | None = None

    def __str__(self) -> str:
        return f"{self.file + ': ' if self.file else ''}sample {self.sample_id!r}: {self.message}"

    @property
    def is_warning(self) -> bool:
        return self.kind in WARNING_KINDS


@dataclass(frozen=True)
class ImageFacts:
    """What opening an image file found: a problem (kind, message) or its mode, size and transparency."""

    problem: tuple[str, str] | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    transparent: bool | None = None  # None: not decoded far enough to tell


def without_sample_name(message: str, sid: str) -> str:
    """A `ConversationError` message without its "sample 'id': " prefix (reports name the sample already)."""
    prefix = f"sample {sid!r}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def record_problems(sample: dict) -> list[tuple[str, str]]:
    """(kind, message) for the record alone, no file access: turns, the `image` field, markers vs images."""
    kind = record_format(sample)
    if kind == "preference":
        return preference_problems(sample)
    if kind == "messages":  # still in its own form: `load_samples` converts every readable one
        return read_messages(sample).problems
    markers = None
    if kind == "text":
        text = sample.get("text")
        problems = [] if isinstance(text, str) and text.strip() else [
            ("bad_conversations", f"'text' is {str(text)[:60]!r}; expected the formatted conversation as a string")]
        markers = text.count(IMAGE_TOKEN) if not problems else None
    else:
        conversations = sample.get("conversations")
        problems = turn_problems(conversations)
        if isinstance(conversations, list):
            # Markers count in human turns only; one in an answer is already `image_in_answer`.
            markers = sum(t["value"].count(IMAGE_TOKEN) for t in conversations[::2]
                          if isinstance(t, dict) and isinstance(t.get("value"), str))
    images = sample_images(sample)
    if any(not isinstance(p, str) or not p.strip() for p in images):
        problems.append(("bad_image_field", f"'image' is {sample.get('image')!r}; expected a relative path or a "
                                            "list of them"))
    elif markers is not None:
        mismatch = marker_problem(markers, len(images))
        if mismatch:
            problems.append(("image_marker_mismatch", mismatch))
    return problems


def image_path_problems(relative: str, image_folder: str | None,
                        allow_outside: bool = False) -> tuple[str | None, list[tuple[str, str]]]:
    """(resolved path or None, problems) of one image path; absolute paths are portable only by luck."""
    problems = []
    if os.path.isabs(relative):
        problems.append(("absolute_image_path", f"image {relative!r} is absolute; expected a path relative to the "
                                                "image folder (the data breaks when the folder moves)"))
    try:
        return resolve_image_path(relative, image_folder, allow_outside), problems
    except ImagePathError as err:
        problems.append(("image_outside_folder", str(err)))
    except ValueError as err:  # e.g. a NUL byte in the path
        problems.append(("bad_image_field", f"image {relative!r}: {err}; expected a file path"))
    return None, problems


def _transparent(img: Image.Image) -> bool:
    """Whether any pixel is (partly) transparent: an opaque RGBA screenshot is not."""
    return has_alpha(img) and img.convert("RGBA").getchannel("A").getextrema()[0] < 255


def inspect_image(path: str, full: bool = True) -> ImageFacts:
    """Open `path`: a missing or corrupt file gives a problem, a good one its mode, size and transparency.

    `full` decodes every pixel (and tells transparency). Otherwise a quick check for training's start:
    `verify()` reads a PNG to its end (chunk CRCs) but not a JPEG's scan data, so JPEGs are decoded at
    1/8 scale instead (cheap, reads every byte, catches a download cut short).
    """
    if not os.path.isfile(path):
        what = "is not a file" if os.path.exists(path) else "not found"
        return ImageFacts(("missing_image", f"missing ({what}: {path}); expected an existing image file"))
    try:
        with Image.open(path) as img:
            mode, size = img.mode, img.size
            if full:
                img.verify()
            elif img.format == "JPEG":
                img.draft("RGB", (1, 1))
                img.load()
            else:
                img.verify()
        if not full:
            return ImageFacts(mode=mode, size=size)
        with Image.open(path) as img:
            img.load()
            return ImageFacts(mode=mode, size=size, transparent=_transparent(img))
    except Exception as err:  # Pillow raises many exception types for broken files
        return ImageFacts(("corrupt_image", f"corrupt ({type(err).__name__}: {err}); expected a complete, "
                                            "readable image"))


def missing_image_hint(relative: str, image_folder: str | None) -> str:
    """"; found at images/x.png: did you forget --image-prefix images?" when the file sits one or two folders
    down (or the path carries one folder too many); "" when it is nowhere near."""
    if not image_folder or os.path.isabs(relative):
        return ""
    for depth in ("*", os.path.join("*", "*")):
        for found in sorted(glob.glob(os.path.join(glob.escape(image_folder), depth, glob.escape(relative))))[:1]:
            prefix = os.path.relpath(found, image_folder)[: -len(relative) - 1]
            return f"; found at {os.path.relpath(found, image_folder)}: did you forget --image-prefix {prefix}?"
    parts = relative.replace("\\", "/").split("/")
    if len(parts) > 1 and os.path.isfile(os.path.join(image_folder, *parts[1:])):
        return f"; found at {'/'.join(parts[1:])}: the paths carry one folder too many ({parts[0]}/)"
    return ""


@dataclass
class SampleChecks:
    """What `check_samples` found: problems (errors and warnings), each sample's resolved image paths, and
    the facts of each distinct image file checked."""

    problems: list[Problem] = field(default_factory=list)
    paths: dict[int, list[str]] = field(default_factory=dict)  # record index -> resolved image paths
    images: dict[str, ImageFacts] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_warning]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.is_warning]

    def first_error_by_sample(self) -> dict[str, str]:
        """Sample id -> the message of its first error (what training lists and skips)."""
        found: dict[str, str] = {}
        for problem in self.errors:
            found.setdefault(problem.sample_id, problem.message)
        return found


def check_samples(samples: list[dict], *, file: str | None = None, image_folder: str | None = None,
                  allow_outside: bool = False, images: str | None = "full", workers: int | None = None,
                  image_facts: dict[str, ImageFacts] | None = None) -> SampleChecks:
    """Every rule except the length one, for every record; image files are opened in parallel threads.

    `images`: None (no file access), "header" (quick check, see `inspect_image`) or "full" (decode).
    `image_facts`: what earlier calls found (path -> facts), read and extended, so records checked in
    chunks open each image once.
    """
    if images not in IMAGE_CHECKS:
        raise ValueError(f"images={images!r}; expected one of {IMAGE_CHECKS}")
    result = SampleChecks()
    uses: list[tuple[int, str, str]] = []  # (index, relative path, resolved path)
    resolved_paths: dict = {}  # a path repeats across records (LLaVA's mix: one image, several sources)
    for index, sample in enumerate(samples):
        sid = sample_id(sample, index)
        found = record_problems(sample)
        if not any(kind == "bad_image_field" for kind, _ in found):
            resolved = []
            for rel in sample_images(sample):
                if rel not in resolved_paths:
                    resolved_paths[rel] = image_path_problems(rel, image_folder, allow_outside)
                path, path_problems = resolved_paths[rel]
                found += path_problems
                if path is not None:
                    resolved.append(path)
                    uses.append((index, rel, path))
            result.paths[index] = resolved
        result.problems += [Problem(index, sid, kind, message, file) for kind, message in found]
    if images is not None:
        known = image_facts if image_facts is not None else {}
        distinct = list(dict.fromkeys(path for _, _, path in uses))
        new = [path for path in distinct if path not in known]
        with ThreadPoolExecutor(workers or min(32, 2 * (os.cpu_count() or 1))) as pool:
            known.update(zip(new, pool.map(lambda p: inspect_image(p, images == "full"), new)))
        result.images = {path: known[path] for path in distinct}
        hints = 0
        for index, rel, path in uses:
            facts = result.images[path]
            sid = sample_id(samples[index], index)
            if facts.problem:
                kind, message = facts.problem
                if kind == "missing_image" and hints < MISSING_HINT_LIMIT:
                    hints += 1
                    message += missing_image_hint(rel, image_folder)
                result.problems.append(Problem(index, sid, kind, f"image {rel!r} {message}", file))
            elif facts.transparent:
                result.problems.append(Problem(
                    index, sid, "transparent_image", f"image {rel!r} has transparent pixels (mode {facts.mode}); "
                    "they are composited onto white (--image_background mean: the processor's mean colour)", file))
    result.problems.sort(key=lambda p: p.index)
    return result


def duplicate_problems(samples: list[dict], file: str | None = None) -> list[Problem]:
    """Records that repeat an earlier record's id, or its images and conversation: warnings, in training as in
    `data_tools.validate`. Repeating a record is how a mixture weights a source, so each is trained on as often
    as it appears; a repeated id makes the reports that name samples by id (skipped, NaN steps) ambiguous."""
    finder = RepeatFinder(file)
    return [problem for index, sample in enumerate(samples) for problem in finder.add(sample, index)]


def content_digest(sample: dict) -> bytes:
    """What makes two records the same sample (images, conversation, `CONTENT_FIELDS`), as 16 bytes."""
    content = json.dumps([sample_images(sample), sample.get("conversations"), *map(sample.get, CONTENT_FIELDS)],
                         sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(content.encode(), digest_size=16).digest()


class RepeatFinder:
    """`duplicate_problems` one record at a time (records read as a stream): `add` gives the record's warnings;
    `add_digest` the same from the record's id and `content_digest` (found elsewhere, e.g. in another process)."""

    def __init__(self, file: str | None = None):
        self.file = file
        self.first_with_id: dict[str, int] = {}
        self.first_with_content: dict[bytes, tuple[int, str]] = {}  # a digest per record: flat memory at 665k

    def add(self, sample: dict, index: int) -> list[Problem]:
        return self.add_digest(sample_id(sample, index), sample.get("id") not in (None, ""), content_digest(sample),
                               index)

    def add_digest(self, sid: str, has_id: bool, digest: bytes, index: int) -> list[Problem]:
        problems = []
        if has_id and self.first_with_id.setdefault(sid, index) != index:
            problems.append(Problem(index, sid, "duplicate_id", f"id already used by record {self.first_with_id[sid]}; "
                                                                 "expected unique ids (reports name samples by id)",
                                    self.file))
        first, first_id = self.first_with_content.setdefault(digest, (index, sid))
        if first != index:
            problems.append(Problem(index, sid, "duplicate_sample", f"same image(s) and conversation as sample "
                                    f"{first_id!r} (record {first}); trained on as often as it appears", self.file))
        return problems


@dataclass(frozen=True)
class LengthCheck:
    """Token length of a sample as training sees it, and what `model_max_length` does to it."""

    length: int | None  # tokens before truncation; None when not tokenized (refused, or `measure` False and fits)
    dropped_turns: int = 0  # trailing turns truncation drops
    problem: tuple[str, str] | None = None  # ("bad_conversations" | "too_long", message)


def check_length(sample: dict, sid: str, tokenizer, template: str, num_image_tokens: int,
                 model_max_length: int | None = None, measure: bool = True) -> LengthCheck:
    """Tokenize as training does: a sample whose first answer cannot fit (a preference pair: that does not fit
    whole) is `too_long`. With `measure` False (the check before training) a sample whose first turn surely
    fits `model_max_length` (`token_bounds`) is not tokenized: its length stays None."""
    if not measure and model_max_length is not None and not is_preference_record(sample):
        try:
            bound = first_turn_upper_bound(sample, tokenizer, template, num_image_tokens, sid)
        except ConversationError as err:
            return LengthCheck(None, problem=("bad_conversations", without_sample_name(str(err), sid)))
        if bound is not None and bound <= model_max_length:
            return LengthCheck(None)
        first_turn = _first_turn_only(sample)
        if first_turn is not None:  # later turns are only truncated: tokenizing the first is enough, and cheaper
            checked = check_length(first_turn, sid, tokenizer, template, num_image_tokens, model_max_length)
            return LengthCheck(None, problem=checked.problem)
    if is_preference_record(sample):
        try:
            pair = tokenize_preference(sample, tokenizer, template, num_image_tokens, sample_id=sid)
        except ConversationError as err:
            return LengthCheck(None, problem=("bad_conversations", without_sample_name(str(err), sid)))
        too_long = model_max_length is not None and pair.length > model_max_length
        return LengthCheck(pair.length, problem=("too_long", f"the pair needs {pair.length} tokens but model_max_length "
                                                             f"is {model_max_length}; a pair is never truncated")
                           if too_long else None)
    try:
        full = tokenize_sample(sample, tokenizer, template, num_image_tokens, sample_id=sid)
    except ConversationError as err:
        return LengthCheck(None, problem=("bad_conversations", without_sample_name(str(err), sid)))
    length = len(full.input_ids)
    if model_max_length is None or length <= model_max_length:
        return LengthCheck(length)
    try:
        fitted = tokenize_sample(sample, tokenizer, template, num_image_tokens, model_max_length, sid)
    except SampleTooLongError as err:
        return LengthCheck(length, problem=("too_long", without_sample_name(str(err), sid)))
    return LengthCheck(length, fitted.dropped_turns)


def _first_turn_only(sample: dict) -> dict | None:
    """`sample` cut to its first question and answer, when that is where all its images are (None otherwise)."""
    turns = sample.get("conversations")
    if record_format(sample) != "conversations" or not isinstance(turns, list) or len(turns) <= 2:
        return None
    first = turns[0].get("value") if isinstance(turns[0], dict) else None
    if not isinstance(first, str) or first.count(IMAGE_TOKEN) != len(sample_images(sample)):
        return None
    return {**sample, "conversations": turns[:2]}
