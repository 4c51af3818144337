"""How groups of samples become splits: shared by partition's drawn split and its kept split (kept_split.py)."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .filter import SourceRule
from .grouping import ImageIndex

NO_VALUE = "(none)"


def assign_groups(group_sizes: list[int], ratios: list[float], seed: int = 0,
                  group_strata: list[str] | None = None) -> list[int]:
    """Split index for each group: seeded shuffle, then each group to the split furthest below target.

    Targets are ratio x samples (within each stratum when `group_strata` is given; ties broken by
    the overall targets). Every split ends within one group's size of its target: a split below
    target by more than the largest group would have taken the groups the others took.
    """
    order = list(range(len(group_sizes)))
    random.Random(seed).shuffle(order)
    strata = group_strata or ["" for _ in group_sizes]
    stratum_total = Counter()
    for size, stratum in zip(group_sizes, strata):
        stratum_total[stratum] += size
    total = sum(group_sizes)
    filled = {s: [0] * len(ratios) for s in stratum_total}
    overall = [0] * len(ratios)
    assignment = [0] * len(group_sizes)
    for group in order:
        size, stratum = group_sizes[group], strata[group]
        deficits = {k: (ratios[k] * stratum_total[stratum] - filled[stratum][k], ratios[k] * total - overall[k], -k)
                    for k in range(len(ratios)) if ratios[k] > 0}
        best = max(deficits, key=deficits.get)
        assignment[group] = best
        filled[stratum][best] += size
        overall[best] += size
    return assignment


def stratum_of(sample: dict, stratify: str) -> str:
    """The sample's value of the stratification field (`source` falls back to the image folder)."""
    value = SourceRule("auto").source_of(sample) if stratify == "source" else sample.get(stratify)
    return NO_VALUE if value is None or value == "" else str(value)


def group_strata(samples: list[dict], groups: list[list[int]], stratify: str | None) -> list[str] | None:
    """Each group's most common stratum (ties: the smallest value); None without --stratify."""
    if stratify is None:
        return None
    strata = []
    for group in groups:
        counts = Counter(stratum_of(samples[i], stratify) for i in group)
        strata.append(min(counts, key=lambda value: (-counts[value], value)))
    return strata


@dataclass
class SplitResult:
    splits: dict[str, list[dict]]  # split name -> samples in input order (only splits with ratio > 0)
    groups: list[list[int]]  # sample indices that stay together
    group_split: list[str]  # split name of each group
    keys: list[list[str]]  # each sample's normalized image paths
    index: ImageIndex | None  # fingerprints, when an image folder was given
