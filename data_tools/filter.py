"""Keep or drop samples by source, and write the source into every kept record.

    python -m data_tools.filter --data all.json --out rs4.json --keep NWPU RSICD LR DOTA \\
        --source-rule prefix --image-folder data/imagenes

A sample's source comes from a rule:
  prefix         the first folder of its (first) image path: `RSICD/images/x.jpg` -> `RSICD`
  field:NAME     the value of the record's field NAME (e.g. `field:source`)
  regex:PATTERN  the first group (or the whole match) of PATTERN searched in the image path
  auto           the record's `source` field when it has one, else `prefix`
Samples whose source cannot be derived (e.g. text-only samples under `prefix`) are `(unknown)`.
With `--image-folder`, image files that do not exist are counted per source (and dropped with
`--drop-missing-images`).
"""
from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from .io import (DataToolError, ImagePathError, add_allow_outside_argument, add_report_argument, check_output_path,
                 cli_errors, image_path_resolver, load_samples, sample_id, sample_images, write_report, write_samples)

UNKNOWN_SOURCE = "(unknown)"


@dataclass(frozen=True)
class SourceRule:
    """How to derive a sample's source: `SourceRule.parse("prefix" | "field:X" | "regex:P" | "auto")`."""

    kind: str
    argument: str = ""

    @classmethod
    def parse(cls, text: str) -> SourceRule:
        kind, _, argument = text.partition(":")
        if kind in ("prefix", "auto") and not argument:
            return cls(kind)
        if kind == "field" and argument:
            return cls("field", argument)
        if kind == "regex" and argument:
            try:
                re.compile(argument)
            except re.error as err:
                raise DataToolError(f"--source-rule {text!r}: invalid regular expression ({err})") from None
            return cls("regex", argument)
        raise DataToolError(f"--source-rule {text!r}: expected 'prefix', 'field:NAME', 'regex:PATTERN' or 'auto'")

    def source_of(self, sample: dict) -> str | None:
        """The sample's source, or None when this rule cannot derive one."""
        if self.kind in ("field", "auto"):
            value = sample.get(self.argument or "source")
            if value is not None and value != "":
                return str(value)
            if self.kind == "field":
                return None
        images = sample_images(sample)
        if not images or not isinstance(images[0], str):
            return None
        path = images[0].replace("\\", "/")
        if self.kind in ("prefix", "auto"):
            parts = [p for p in path.split("/") if p not in ("", ".")]
            return parts[0] if len(parts) > 1 else None
        match = re.search(self.argument, path)
        if match is None:
            return None
        return match.group(1) if match.re.groups else match.group(0)


@dataclass
class FilterResult:
    kept: list[dict]
    dropped: list[dict] = field(default_factory=list)  # {"id", "source", "reason"}
    kept_per_source: Counter = field(default_factory=Counter)
    dropped_per_source: Counter = field(default_factory=Counter)
    missing_images: list[dict] = field(default_factory=list)  # {"id", "source", "image"}


def filter_samples(samples: list[dict], rule: SourceRule, keep=None, drop=None, image_folder: str | None = None,
                   drop_missing_images: bool = False, allow_outside: bool = False) -> FilterResult:
    """Samples whose source is in `keep` (or not in `drop`), each a copy with `source` set.

    With `image_folder`, samples whose image files do not exist are listed (and dropped when
    `drop_missing_images`). Input records are not modified.
    """
    if keep is not None and drop is not None:
        raise DataToolError("give --keep or --drop, not both")
    keep, drop = (set(keep) if keep is not None else None), set(drop or ())
    result = FilterResult(kept=[])
    exists: dict[str, bool] = {}
    resolve = image_path_resolver(image_folder, allow_outside) if image_folder is not None else None
    for index, sample in enumerate(samples):
        sid, source = sample_id(sample, index), rule.source_of(sample)
        label = source if source is not None else UNKNOWN_SOURCE
        reason = None
        if keep is not None and label not in keep:
            reason = f"source {label!r} not in --keep"
        elif label in drop:
            reason = f"source {label!r} in --drop"
        if reason is None and image_folder is not None:
            missing = []
            for rel in sample_images(sample):
                try:
                    path = resolve(rel)
                except ImagePathError as err:
                    raise DataToolError(f"sample {sid!r}: {err}") from None
                if path not in exists:
                    exists[path] = os.path.isfile(path)
                if not exists[path]:
                    missing.append(rel)
                    result.missing_images.append({"id": sid, "source": label, "image": rel})
            if missing and drop_missing_images:
                reason = f"image {missing[0]!r} not found under {image_folder}"
        if reason is None:
            record = dict(sample)
            if source is not None:
                record["source"] = source
            result.kept.append(record)
            result.kept_per_source[label] += 1
        else:
            result.dropped.append({"id": sid, "source": label, "reason": reason})
            result.dropped_per_source[label] += 1
    return result


def build_parser(default_keep: list[str] | None = None, prog: str = "python -m data_tools.filter",
                 description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="LLaVA JSON or JSONL file")
    parser.add_argument("--out", required=True, help="where to write the kept samples (JSON, or JSONL by extension)")
    choice = parser.add_mutually_exclusive_group()
    keep_help = "sources to keep" + (f" (default: {' '.join(default_keep)})" if default_keep else "")
    choice.add_argument("--keep", nargs="+", default=default_keep, metavar="SOURCE", help=keep_help)
    choice.add_argument("--drop", nargs="+", metavar="SOURCE", help="sources to drop (keep the rest)")
    parser.add_argument("--source-rule", default="prefix",
                        help="prefix | field:NAME | regex:PATTERN | auto (default prefix)")
    parser.add_argument("--image-folder", help="count (and optionally drop) samples whose image files are missing")
    parser.add_argument("--drop-missing-images", action="store_true", help="drop samples with a missing image file")
    add_allow_outside_argument(parser)
    add_report_argument(parser)
    return parser


def run(argv, parser: argparse.ArgumentParser) -> int:
    """Parse `argv` with `parser` (filter's or prepare's) and filter."""
    args = parser.parse_args(argv)
    if args.drop is not None:
        args.keep = None
    check_output_path(args.out, [args.data])
    check_output_path(args.report, [args.data, args.out])
    rule = SourceRule.parse(args.source_rule)
    samples = load_samples(args.data)
    result = filter_samples(samples, rule, args.keep, args.drop, args.image_folder, args.drop_missing_images,
                            args.allow_images_outside_folder)
    write_samples(args.out, result.kept)
    sources = sorted(set(result.kept_per_source) | set(result.dropped_per_source))
    missing = Counter(m["source"] for m in result.missing_images)
    print(f"{args.data}: {len(samples)} samples, kept {len(result.kept)}, dropped {len(result.dropped)} "
          f"(source rule {args.source_rule}) -> {args.out}")
    print(f"  {'source':20s} {'kept':>8s} {'dropped':>8s}" + (f" {'missing images':>15s}" if args.image_folder else ""))
    for source in sources:
        line = f"  {source:20s} {result.kept_per_source[source]:8d} {result.dropped_per_source[source]:8d}"
        print(line + (f" {missing[source]:15d}" if args.image_folder else ""))
    unmatched = sorted(set(args.keep or args.drop or ()) - set(sources))
    if unmatched:
        print(f"warning: no sample has source {', '.join(unmatched)}; sources found: {', '.join(sources)}")
    for item in result.missing_images[:10]:
        print(f"  missing image: sample {item['id']!r}: {item['image']}")
    write_report(args.report, {
        "data": args.data, "out": args.out, "source_rule": args.source_rule,
        "keep": args.keep, "drop": args.drop, "num_samples": len(samples),
        "kept": len(result.kept), "dropped": len(result.dropped),
        "per_source": {s: {"kept": result.kept_per_source[s], "dropped": result.dropped_per_source[s],
                           **({"missing_images": missing[s]} if args.image_folder else {})} for s in sources},
        "unmatched_sources": unmatched,
        "missing_images": result.missing_images,
        "dropped_samples": result.dropped,
    })
    return 0


@cli_errors
def main(argv=None) -> int:
    return run(argv, build_parser())


if __name__ == "__main__":
    raise SystemExit(main())
