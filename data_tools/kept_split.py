"""`partition --keep-split`: a dataset's own train/val/test split, kept instead of drawn.

    python -m data_tools.partition --data slake.json --image-folder imgs --out-dir sets --keep-split split \\
        [--split-value test=validation]

Each record's FIELD (a table's `split` column, which `convert` keeps as a record field) names its split.
Usual names are understood (train/training, val/valid/validation/dev, test/testing, any case);
`--split-value NAME=VALUE` maps any other value (e.g. `test=validation` for a set whose only held-out
part is called validation). A set with no validation part gets one drawn from its train part by image
groups, in the proportion of --ratios (val / (train + val)), stratified like a drawn partition; the
test part is never touched. Images shared across the kept parts are reported (leakage_report.json,
exit status 1) as for a drawn partition: an official split can leak too.
"""
from __future__ import annotations

from collections import Counter

from .grouping import group_samples_by_image, image_keys, index_images
from .io import DataToolError, sample_id
from .split_groups import SplitResult, assign_groups, group_strata

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


def parse_split_values(pairs) -> dict[str, str]:
    """`--split-value NAME=VALUE ...` as {VALUE: NAME} (NAME one of train, val, test)."""
    mapping = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or name not in ("train", "val", "test") or not value:
            raise DataToolError(f"--split-value {pair!r}: expected NAME=VALUE with NAME train, val or test")
        mapping[value] = name
    return mapping


def split_names(samples: list[dict], field: str, values: dict[str, str], data_name: str) -> list[str]:
    """Each sample's split name ("train", "val", "test") from its `field`; DataToolError naming the samples
    without the field or with a value that names no split."""
    names, missing, unknown = [], [], {}
    for i, sample in enumerate(samples):
        value = sample.get(field)
        if value is None or str(value).strip() == "":
            missing.append(sample_id(sample, i))
            names.append("")
            continue
        text = str(value).strip()
        name = values.get(text) or SPLIT_ALIASES.get(text.lower())
        if name is None:
            unknown.setdefault(text, []).append(sample_id(sample, i))
        names.append(name or "")
    if missing:
        raise DataToolError(f"{data_name}: --keep-split {field}: {len(missing)} sample(s) have no {field!r} field, "
                            f"e.g. sample {missing[0]!r}; give every record one, or drop --keep-split to draw a split")
    if unknown:
        found = ", ".join(f"{v!r} ({len(ids)} samples, e.g. {ids[0]!r})" for v, ids in sorted(unknown.items()))
        raise DataToolError(f"{data_name}: --keep-split {field}: values that name no split: {found}; map them with "
                            f"--split-value NAME=VALUE (NAME train, val or test)")
    if "train" not in names or "test" not in names:
        counts = dict(Counter(names))
        raise DataToolError(f"{data_name}: --keep-split {field}: expected a train and a test part, found {counts}")
    return names


def keep_split(samples: list[dict], field: str, values: dict[str, str], ratios: dict[str, float], seed: int,
               image_folder: str | None, stratify: str | None, phash_threshold: int, workers: int | None,
               allow_outside: bool, data_name: str):
    """A `SplitResult` holding the samples' own split (see the module docstring)."""
    names = split_names(samples, field, values, data_name)
    keys = image_keys(samples, data_name)
    index = None
    if image_folder is not None:
        labels = [repr(sample_id(s, i)) for i, s in enumerate(samples)]
        index = index_images(keys, image_folder, allow_outside, phash_threshold, workers=workers, sample_names=labels)
    groups = group_samples_by_image(keys, index)
    if "val" not in names and ratios["val"] > 0:
        # groups wholly in train may move to val; a group that spans kept parts stays where it is (leakage)
        movable = [g for g in groups if all(names[i] == "train" for i in g)]
        strata = group_strata(samples, movable, stratify)
        share = ratios["val"] / (ratios["train"] + ratios["val"])
        for group, to_val in zip(movable, assign_groups([len(g) for g in movable], [1 - share, share], seed, strata)):
            for i in group:
                names[i] = "val" if to_val else "train"
    splits = {name: [s for s, where in zip(samples, names) if where == name] for name in ("train", "val", "test")}
    splits = {name: split for name, split in splits.items() if split}
    group_split = [Counter(names[i] for i in g).most_common(1)[0][0] for g in groups]
    return SplitResult(splits, groups, group_split, keys, index), names
