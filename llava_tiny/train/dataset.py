"""Training data (every format `llava_tiny.data` reads) -> training examples (lazy), and the collator that
batches them.

Samples are checked before training starts (`llava_tiny.checks`: the record's rules, image existence
and header in parallel, the length), so a bad sample stops the run in seconds with the list of
samples, not hours later. The check's result is cached (`check_cache`: a warm start with nothing changed
reads it) and the records stay in the file, read per item (`record_store`).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..anyres import AnyresTiling
from ..checks import RepeatFinder, check_length, check_samples
from ..conversation import IGNORE_INDEX, tokenize_sample
from ..data import load_samples, normalise_record, record_format, sample_id, sample_images  # noqa: F401 (re-exported)
from ..images import load_image, preprocess_images, resolve_image_path
from . import check_cache
from .check_cache import CheckResult
from .check_pool import checked_chunks
from .record_store import RecordStore

logger = logging.getLogger(__name__)


class BadSamplesError(ValueError):
    """Samples that cannot be used; the message lists their ids and what is wrong."""


class ImageDecodeError(RuntimeError):
    """An image that passed the pre-training check but fails to decode when used; names the sample and path."""


class LazySupervisedDataset(Dataset):
    """Tokenizes and loads images per item; `<image>` expands to the tower's exact token count."""

    def __init__(self, data_path: str, tokenizer, image_processor, template: str, num_image_tokens: int,
                 image_folder: str | None = None, image_aspect_ratio: str = "pad", model_max_length: int = 2048,
                 skip_bad_samples: bool = False, allow_images_outside_folder: bool = False,
                 max_bad_sample_fraction: float = 0.01, report_dir: str | None = None, image_background: str = "white",
                 data_cache_dir: str | None = None, anyres: AnyresTiling | None = None):
        if anyres is not None:
            # LLaVA-NeXT's anyres: each image's `<image>` takes its own count (`_load_item`); the check before
            # training, which opens no image, counts every image at the most one can take, so a sample it lets
            # through is never cut into whatever its images' sizes.
            image_aspect_ratio, num_image_tokens = "anyres", anyres.max_image_tokens
        self.anyres = anyres
        self.data_path = data_path
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.num_image_tokens = num_image_tokens
        self.image_folder = image_folder
        self.image_aspect_ratio = image_aspect_ratio
        self.image_background = image_background
        self.model_max_length = model_max_length
        self.allow_outside = allow_images_outside_folder
        self.skip_bad_samples = skip_bad_samples
        self.max_bad_sample_fraction = max_bad_sample_fraction
        self.report_dir = report_dir
        found = self._checked(data_path, data_cache_dir)
        self.num_records = len(found.ids)
        if found.texts:
            logger.warning("%s: %d of %d records are a formatted 'text': every token of them is trained, the prompts "
                           "too; records with 'messages' (or LLaVA 'conversations') train on the answers only",
                           data_path, found.texts, self.num_records)
        _warn_repeated_records(found, data_path)
        problems = found.problems
        if problems:
            listing = "\n".join(f"  {sid}: {why}" for sid, why in list(problems.items())[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            summary = f"{data_path}: {len(problems)} of {self.num_records} samples cannot be used:\n{listing}{more}"
            if not skip_bad_samples:
                raise BadSamplesError(summary + "\nFix them (python -m data_tools.validate) or pass --skip_bad_samples")
            if len(problems) > max_bad_sample_fraction * self.num_records:
                raise BadSamplesError(summary + f"\nmore than {max_bad_sample_fraction:.1%} of the data is bad; stopping")
            logger.warning("%s\nskipping them (--skip_bad_samples)", summary)
        keep = [i for i, sid in enumerate(found.ids) if sid not in problems]
        # Records stay in the file (byte ranges, read per item): flat memory per rank up to LLaVA's 665k.
        self.samples = RecordStore(data_path, found.starts, found.ends).select(keep)
        self.ids = [found.ids[i] for i in keep]
        self._lengths = [found.lengths[i] for i in keep]
        self.skipped = dict(problems)
        if problems:
            self._write_skipped_report("skipped_samples.json")

    def _check_settings(self) -> dict:
        """What the check's result depends on besides the data file and the tokenizer (`check_cache.check_key`)."""
        return {"kind": type(self).__name__, "template": getattr(self.template, "name", self.template),
                "template_spec": repr(self.template), "num_image_tokens": self.num_image_tokens,
                "model_max_length": self.model_max_length, "image_aspect_ratio": self.image_aspect_ratio,
                "image_folder": os.path.realpath(self.image_folder) if self.image_folder else None,
                "allow_outside": self.allow_outside, "text_only": self.image_processor is None}

    def _checked(self, data_path: str, data_cache_dir: str | None) -> CheckResult:
        """The check's result: from the cache when nothing it depends on changed, else checked (and cached).
        Every process takes the same path (a process that misses makes all of them check, in shares)."""
        if not os.path.isfile(data_path):
            load_samples(data_path)  # its "file not found" error
        where = check_cache.cache_file(data_path, data_cache_dir)
        key = check_cache.check_key(data_path, self.tokenizer, self._check_settings())
        found = check_cache.load(where, key)
        if _world()[1] > 1:
            hits = [None] * _world()[1]
            dist.all_gather_object(hits, found is not None)
            found = found if all(hits) else None
        if found is not None:
            logger.info("%s: %d records, checked at an earlier start (%s)", data_path, len(found.ids), where)
            return found
        found = self._check(data_path)
        if int(os.environ.get("LOCAL_RANK", _world()[0])) == 0:
            check_cache.save(where, key, found)
        return found

    def _check(self, data_path: str) -> CheckResult:
        """Read the file once and check it, in chunks, in parallel (`check_pool`). With several processes each
        checks every world_size-th record and the shares are merged, so each rank does 1/world_size of the work
        (8 ranks on a node checked the same records 8 times) and all get the same answer: problems in the
        file's order, every length."""
        rank, world = _world()
        found, mine = CheckResult(), {"problems": {}, "lengths": [], "images": {}}
        repeats, repeated = RepeatFinder(data_path) if rank == 0 else None, []
        for first, starts, ends, checked in checked_chunks(self, data_path, rank, world):
            found.starts.extend(starts)
            found.ends.extend(ends)
            found.ids += checked["ids"]
            found.texts += checked["texts"]
            if repeats is not None:
                for index, sid, (has_id, digest) in zip(range(first, first + len(starts)), checked["ids"],
                                                        checked["digests"]):
                    repeated += repeats.add_digest(sid, has_id, digest, index)
            mine["problems"].update(checked["problems"])
            mine["lengths"] += checked["lengths"]
            mine["images"].update(checked["images"])
        shares = [mine]
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, mine)
        found.lengths = [0] * len(found.ids)
        for r, checked in enumerate(shares):
            found.lengths[r::world] = checked["lengths"]
            found.images.update(checked["images"])
        merged = {sid: why for checked in shares for sid, why in checked["problems"].items()}
        found.problems = {sid: merged[sid] for sid in found.ids if sid in merged}
        found.repeated = sorted(Counter(p.kind for p in repeated).items())
        found.repeated_examples = [f"sample {p.sample_id!r}: {p.message}" for p in repeated[:3]]
        return found

    def _check_share(self, share: list[dict], mine: dict, facts: dict) -> None:
        """Check some records of this process's share; add their problems, lengths and images' state to `mine`."""
        if not share:
            return
        # The quick image check (headers; JPEGs at 1/8 scale): a full decode happens when an item is used.
        checked = check_samples(share, file=self.data_path, image_folder=self.image_folder,
                                allow_outside=self.allow_outside, images="header", image_facts=facts)
        problems = checked.first_error_by_sample()
        if self.image_processor is None:  # a text-only run
            problems.update({sample_id(s, i): "has an image, but this run has no vision tower (text-only); pass "
                             "--vision_tower to train on images" for i, s in enumerate(share)
                             if sample_images(s) and sample_id(s, i) not in problems})
        problems.update(self._unfit_samples(share, problems))
        mine["problems"].update(problems)
        mine["images"].update({path: check_cache.image_state(path) for path in checked.images
                               if path not in mine["images"]})
        mine["lengths"] += [0 if sample_id(s, i) in problems else self._modality_length(s) for i, s in enumerate(share)]

    def _write_skipped_report(self, name: str) -> None:
        if self.report_dir:
            os.makedirs(self.report_dir, exist_ok=True)
            with open(os.path.join(self.report_dir, name), "w") as f:
                json.dump(self.skipped, f, indent=2)

    def record_skipped(self, problems: dict[str, str], process_index: int = 0) -> None:
        """Count and record samples skipped mid-run (`__getitem__` with --skip_bad_samples), in the training
        process: the file lists them with the ones skipped before training; too many stop the run."""
        new = {sid: why for sid, why in problems.items() if sid not in self.skipped}
        if not new:
            return
        self.skipped.update(new)
        logger.warning("%d sample(s) skipped so far (--skip_bad_samples), listed in %s", len(self.skipped),
                       os.path.join(self.report_dir or "", "skipped_samples.json"))
        self._write_skipped_report("skipped_samples.json" if process_index == 0
                                   else f"skipped_samples.rank{process_index}.json")
        if len(self.skipped) > self.max_bad_sample_fraction * self.num_records:
            listing = "\n".join(f"  {sid}: {why}" for sid, why in new.items())
            raise BadSamplesError(f"{self.data_path}: {len(self.skipped)} of {self.num_records} samples are bad, more "
                                  f"than {self.max_bad_sample_fraction:.1%}; stopping. Found during training:\n{listing}")

    def _unfit_samples(self, samples, known) -> dict[str, str]:
        """Samples that tokenizing refuses or that cannot fit model_max_length (labels would be all -100)."""
        unfit = {}
        for i, sample in enumerate(samples):
            sid = sample_id(sample, i)
            if sid not in known:
                checked = check_length(sample, sid, self.tokenizer, self.template, self.num_image_tokens,
                                       self.model_max_length, measure=False)
                if checked.problem:
                    unfit[sid] = checked.problem[1]
        return unfit

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's length proxy per sample (`_modality_length`), found by the check before training."""
        return self._lengths

    def _modality_length(self, sample: dict) -> int:
        """Words (+ image tokens), negative for text-only samples."""
        turns = [{"value": sample["text"]}] if record_format(sample) == "text" else sample["conversations"]
        words = sum(len(turn["value"].split()) for turn in turns)
        n_images = len(sample_images(sample))
        return words + n_images * self.num_image_tokens if n_images else -words

    def __getitem__(self, index: int) -> dict:
        if not self.skip_bad_samples:
            return self._load_item(index)
        # A sample whose image fails to decode is replaced by the next one that loads; the batch
        # carries the skipped ids to the training process (CollatorWithMetadata, record_skipped).
        skipped = {}
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            try:
                item = self._load_item(candidate)
            except ImageDecodeError as err:
                logger.warning("%s; skipping it (--skip_bad_samples)", err)
                skipped[self.ids[candidate]] = str(err)
                continue
            if skipped:
                item["skipped_samples"] = skipped
            return item
        raise BadSamplesError(f"{self.data_path}: no sample's images could be decoded: {skipped}")

    def _load_item(self, index: int) -> dict:
        sample, sid = self.samples[index], self.ids[index]
        paths = sample_images(sample)
        if self.anyres is not None:
            return self._load_anyres_item(sample, sid, paths)
        tokens = tokenize_sample(sample, self.tokenizer, self.template, self.num_image_tokens, self.model_max_length,
                                 sid)
        item = {"input_ids": torch.tensor(tokens.input_ids), "labels": torch.tensor(tokens.labels), "sample_id": sid}
        if paths:
            item["pixel_values"] = self._load_images(paths, sid)
        return item

    def _load_anyres_item(self, sample: dict, sid: str, paths: list[str]) -> dict:
        """An item under anyres: each `<image>` expanded to its image's own count (the count stock
        `LlavaNextProcessor` gives), `pixel_values` [images, 1 + most tiles, 3, tile, tile] and `image_sizes`."""
        images = self._open_images(paths, sid)
        counts = [self.anyres.image_tokens(image) for image in images]
        tokens = tokenize_sample(sample, self.tokenizer, self.template, counts, self.model_max_length, sid)
        item = {"input_ids": torch.tensor(tokens.input_ids), "labels": torch.tensor(tokens.labels), "sample_id": sid}
        if images:
            item.update(self.anyres.pixel_values(images, self.image_processor, self.image_background))
        return item

    def _load_images(self, paths: list[str], sid: str) -> torch.Tensor:
        """The sample's images as the tower's pixel values; `ImageDecodeError` names the sample and the path."""
        images = self._open_images(paths, sid)
        return preprocess_images(images, self.image_processor, self.image_aspect_ratio, self.image_background)

    def _open_images(self, paths: list[str], sid: str) -> list:
        """The sample's images, decoded; `ImageDecodeError` names the sample and the path."""
        images = []
        for rel in paths:
            path = resolve_image_path(rel, self.image_folder, self.allow_outside)
            try:
                images.append(load_image(path))
            except Exception as err:
                raise ImageDecodeError(f"{self.data_path}: sample {sid!r}: cannot decode image {path}: {err}") from err
        return images


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _warn_repeated_records(found: CheckResult, data_path: str) -> None:
    """Repeated records are trained on as they are (`checks.duplicate_problems`), and said once."""
    if found.repeated:
        kinds = ", ".join(f"{n} {kind}" for kind, n in found.repeated)
        logger.warning("%s: %s (each record is trained on as often as it appears; python -m data_tools.validate "
                       "lists them), e.g. %s", data_path, kinds, "; ".join(found.repeated_examples))


class BatchMetadata(NamedTuple):
    """What rides in a batch for the trainer, not for the model: the samples' ids (the NaN guard names
    them) and the samples skipped while loading it (id -> why)."""

    sample_ids: list[str]
    skipped: dict[str, str]


class CollatorWithMetadata:
    """Wraps a collator: the batch's `BatchMetadata` rides along in it (`sample_ids` from the collators,
    `skipped_samples` from the items), so the training process counts and records the skipped samples even
    when dataloader workers (other processes) hit them; `split` is the one place that takes it out again."""

    KEYS = ("sample_ids", "skipped_samples")

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collator(items)
        skipped = {sid: why for item in items for sid, why in item.get("skipped_samples", {}).items()}
        if skipped:
            batch["skipped_samples"] = skipped
        return batch

    @classmethod
    def split(cls, batch: dict) -> tuple[dict, BatchMetadata]:
        """(the model's inputs, the batch's metadata)."""
        metadata = BatchMetadata(list(batch.get("sample_ids", [])), dict(batch.get("skipped_samples") or {}))
        return {key: value for key, value in batch.items() if key not in cls.KEYS}, metadata


class DataCollatorForSupervisedDataset:
    """Right-pads ids (pad id) and labels (-100); stacks images in sample order (anyres: each image's tiles
    zero-padded to the batch's most, and their `image_sizes`)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "sample_ids": [item["sample_id"] for item in items]}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels and pixels[0].dim() == 5:  # anyres: [images, tiles, 3, h, w], tiles zero-padded to the batch's most
            most = max(p.shape[1] for p in pixels)
            pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
            batch["image_sizes"] = torch.cat([item["image_sizes"] for item in items if "image_sizes" in item])
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch
