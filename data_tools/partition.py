"""Split LLaVA data into train/val/test so that no picture is in two splits.

    python -m data_tools.partition --data data/dataset.json --image-folder data/imagenes \\
        --out-dir data/sets --ratios 0.7 0.1 0.2 --seed 0 [--stratify source]

Writes data_train.json, data_val.json and data_test.json (samples keep their input order) and
leakage_report.json in --out-dir. Ratios: three values are train, val, test; two values are
train and test, and val gets what is left (none when they sum to 1), as the RS project's
`crear_datasets(directorio, train_ratio, test_ratio)`.

Samples are split by groups, never one by one: every sample sharing an image, an identical file
under another name, or a near-duplicate image (re-encoded copy) is in the same split. Groups are
shuffled with --seed and each goes to the split furthest below its target, so every split's
size is within one group's size of ratio x samples. With --stratify the targets hold within each
value of that field (source, answer_type, question_type) as well.

With --keep-split [FIELD] the records' own split (FIELD, default `split`) is kept instead
(data_tools/kept_split.py); a missing val part is drawn from train, leakage is audited the same way.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

from .check_leakage import audit_splits, print_leakage
from .grouping import add_image_comparison_arguments, group_samples_by_image, image_keys, index_images
from .images import DEFAULT_COLOR_THRESHOLD, DEFAULT_PHASH_THRESHOLD
from .io import (DataToolError, add_allow_outside_argument, add_report_argument, check_output_path, cli_errors,
                 load_samples, sample_id, write_json, write_report)
from .kept_split import keep_split, parse_split_values
from .split_groups import SplitResult, assign_groups, group_strata, stratum_of

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FILES = {name: f"data_{name}.json" for name in SPLIT_NAMES}
LEAKAGE_REPORT = "leakage_report.json"
def parse_ratios(values) -> dict[str, float]:
    """{"train", "val", "test"} -> fraction from 3 values (train val test) or 2 (train test)."""
    values = [float(v) for v in values]
    if any(v < 0 for v in values):
        raise DataToolError(f"--ratios {values}: ratios must not be negative")
    if len(values) == 3:
        train, val, test = values
        if abs(train + val + test - 1) > 1e-6:
            raise DataToolError(f"--ratios {values}: train, val and test must sum to 1 (they sum to {sum(values):g})")
    elif len(values) == 2:
        train, test = values
        val = 1 - train - test
        if val < -1e-6:
            raise DataToolError(f"--ratios {values}: train and test sum to {train + test:g}; expected at most 1")
        val = val if val > 1e-6 else 0.0  # float noise of ratios that sum to 1
    else:
        raise DataToolError(f"--ratios takes 3 values (train val test) or 2 (train test); got {len(values)}")
    if train + val + test <= 0:
        raise DataToolError("--ratios: at least one ratio must be positive")
    return {"train": train, "val": val, "test": test}


def group_split_by_image(samples: list[dict], ratios=(0.7, 0.1, 0.2), seed: int = 0, image_folder: str | None = None,
                         stratify: str | None = None, phash_threshold: int = DEFAULT_PHASH_THRESHOLD,
                         color_threshold: float = DEFAULT_COLOR_THRESHOLD, workers: int | None = None,
                         allow_outside: bool = False, data_name: str = "data") -> SplitResult:
    """Split samples into train/val/test keeping every group of samples showing one picture together.

    Without `image_folder`, groups come from shared image paths only; with it, identical files and
    near duplicates join groups too. `ratios` as for `parse_ratios`.
    """
    named = parse_ratios(ratios) if not isinstance(ratios, dict) else ratios
    keys = image_keys(samples, data_name)
    index = None
    if image_folder is not None:
        names = [repr(sample_id(s, i)) for i, s in enumerate(samples)]
        index = index_images(keys, image_folder, allow_outside, phash_threshold, color_threshold, workers, names)
    groups = group_samples_by_image(keys, index)
    names = list(named)
    assignment = assign_groups([len(g) for g in groups], [named[n] for n in names], seed,
                               group_strata(samples, groups, stratify))
    split_of_sample = [""] * len(samples)
    for group, split in zip(groups, assignment):
        for i in group:
            split_of_sample[i] = names[split]
    splits = {name: [s for s, where in zip(samples, split_of_sample) if where == name]
              for name in names if named[name] > 0}
    return SplitResult(splits, groups, [names[k] for k in assignment], keys, index)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.partition", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="LLaVA JSON or JSONL file to split")
    parser.add_argument("--image-folder", help="folder the image paths are relative to (enables content grouping)")
    parser.add_argument("--out-dir", default=os.path.join("data", "sets"), help="output folder (default data/sets)")
    parser.add_argument("--ratios", nargs="+", default=["0.7", "0.1", "0.2"],
                        help="train val test (default 0.7 0.1 0.2), or train test")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--stratify", metavar="FIELD",
                        help="keep the ratios within each value of this record field: source (from the image path "
                             "when absent), answer_type, question_type, or any other field (synthesize writes scene)")
    parser.add_argument("--keep-split", nargs="?", const="split", metavar="FIELD",
                        help="keep the split each record names in FIELD (default split: train/val/test, any usual "
                             "name) instead of drawing one; a missing val part is drawn from train by --ratios")
    parser.add_argument("--split-value", action="append", metavar="NAME=VALUE",
                        help="with --keep-split: records whose FIELD is VALUE go to split NAME (train, val, test), "
                             "e.g. test=validation; repeatable")
    add_image_comparison_arguments(parser)
    add_allow_outside_argument(parser)
    add_report_argument(parser)
    return parser


def _summary(result: SplitResult, samples: list[dict], named: dict[str, float], stratify: str | None) -> dict:
    total = len(samples)
    sizes = [len(g) for g in result.groups]
    largest = max(range(len(sizes)), key=lambda g: (sizes[g], -g)) if sizes else None
    first = result.groups[largest][0] if sizes else None
    per_split = {}
    for name, split in result.splits.items():
        per_split[name] = {"samples": len(split), "fraction": round(len(split) / total, 4) if total else 0.0,
                           "target": named[name], "groups": result.group_split.count(name)}
    summary = {"num_samples": total, "num_groups": len(sizes), "splits": per_split,
               "largest_group": {"samples": sizes[largest], "first_sample": sample_id(samples[first], first)}
               if sizes else None}
    if result.index is not None:
        hashes = Counter(fp.sha256 for fp in result.index.fingerprints.values() if fp.sha256)
        summary["identical_image_files"] = sum(n for n in hashes.values() if n > 1)
        summary["near_duplicate_pairs"] = len(result.index.near_pairs)
    if stratify:
        table: dict[str, dict[str, int]] = {}
        for name, split in result.splits.items():
            for sample in split:
                row = table.setdefault(stratum_of(sample, stratify), {n: 0 for n in result.splits})
                row[name] += 1
        summary["per_" + stratify] = dict(sorted(table.items()))
    return summary


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    named = parse_ratios(args.ratios)
    if args.split_value and not args.keep_split:
        raise DataToolError("--split-value maps values of the --keep-split field; add --keep-split")
    values = parse_split_values(args.split_value)
    outputs = {name: os.path.join(args.out_dir, SPLIT_FILES[name]) for name in SPLIT_NAMES
               if named[name] > 0 or args.keep_split}
    leakage_path = os.path.join(args.out_dir, LEAKAGE_REPORT)
    for path in [*outputs.values(), leakage_path, args.report]:
        check_output_path(path, [args.data])
    samples = load_samples(args.data)
    sample_split = None
    if args.keep_split:
        result, sample_split = keep_split(samples, args.keep_split, values, named, args.seed, args.image_folder,
                                          args.stratify, args.phash_threshold, args.workers,
                                          args.allow_images_outside_folder, args.data)
        outputs = {name: path for name, path in outputs.items() if name in result.splits}
        named = {name: (len(result.splits.get(name, ())) / len(samples)) for name in SPLIT_NAMES}
    else:
        result = group_split_by_image(samples, named, args.seed, args.image_folder, args.stratify,
                                      args.phash_threshold, workers=args.workers,
                                      allow_outside=args.allow_images_outside_folder, data_name=args.data)
    for name, path in outputs.items():
        write_json(path, result.splits[name])
    split_keys = {name: [] for name in result.splits}
    split_ids = {name: [] for name in result.splits}
    # a kept split can part a group of samples (that is the leakage to find): audit sample by sample
    members = ([(i, sample_split[i]) for i in range(len(samples))] if sample_split is not None else
               [(i, name) for group, name in zip(result.groups, result.group_split) for i in group])
    for i, name in members:
        split_keys[name].append(result.keys[i])
        split_ids[name].append(sample_id(samples[i], i))
    leakage = audit_splits(split_keys, split_ids, result.index)
    summary = _summary(result, samples, named, args.stratify)
    write_json(leakage_path, {"data": args.data, "seed": args.seed, "ratios": named, "kept_split": args.keep_split,
                              "phash_threshold": args.phash_threshold, **leakage})
    how = f"the records' own split ({args.keep_split!r})" if args.keep_split else f"seed {args.seed}"
    print(f"{args.data}: {len(samples)} samples in {summary['num_groups']} image groups, {how} -> {args.out_dir}")
    for name, row in summary["splits"].items():
        print(f"  {name:5s} {row['samples']:8d} samples ({row['fraction']:.1%}, target {row['target']:.0%}), "
              f"{row['groups']} groups -> {outputs[name]}")
    largest = summary["largest_group"]
    if largest:
        print(f"  largest group: {largest['samples']} samples (first {largest['first_sample']!r}); "
              "split sizes are exact up to one group")
        if largest["samples"] > 0.05 * len(samples) and len(samples) >= 100:
            print("warning: one group holds more than 5% of the data; check the near-duplicate threshold "
                  "(--phash-threshold) or the data")
    if "identical_image_files" in summary:
        print(f"  images joined: {summary['identical_image_files']} files with identical bytes, "
              f"{summary['near_duplicate_pairs']} near-duplicate pairs")
    stale = [name for name in SPLIT_NAMES
             if named[name] == 0 and os.path.exists(os.path.join(args.out_dir, SPLIT_FILES[name]))]
    for name in stale:
        print(f"warning: {os.path.join(args.out_dir, SPLIT_FILES[name])} is left from an earlier run; "
              "it is not part of this partition")
    print(f"leakage across the written splits ({leakage_path}):")
    print_leakage(leakage)
    write_report(args.report, {**summary, "leakage": leakage, "stale_files": stale})
    return 1 if leakage["shared_images"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
