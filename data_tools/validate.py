"""Check LLaVA data before training: structure, images, `<image>` markers, duplicates, lengths.

    python -m data_tools.validate --data data/sets/data_train.json --image-folder data/imagenes \\
        [--tokenizer TinyLlama/... --version llava_v1 --model-max-length 2048] \\
        [--write-clean clean.json] [--report report.json]

Errors (the sample cannot be trained on as it is; exit code 1 when there are any); the rules are
`llava_tiny.checks`, the ones training applies:
  missing_id                     every sample needs an `id`
  bad_conversations, bad_roles   `conversations` alternates human/gpt, starts with human, ends with gpt
  empty_turn, image_in_answer    no empty turn; `<image>` only in human turns
  bad_image_field                `image` is a path or a list of paths
  image_outside_folder           absolute or `../` image paths (unless --allow-images-outside-folder)
  missing_image, corrupt_image   every image exists and decodes completely (a missing image found one or
                                 two folders down is named: "found at images/x.png: did you forget
                                 --image-prefix images?")
  image_marker_mismatch          one `<image>` marker per image, no marker without an image
  too_long                       with --model-max-length: not even the first answer fits (a preference
                                 pair: the pair does not fit whole)
  no_prompt, missing_chosen,     preference records (DPO: `prompt`/`messages` + `chosen` + `rejected`): a
  missing_rejected,              prompt and two different, non-empty answers without `<image>`
  identical_answers
Warnings: duplicate_id and duplicate_sample (an id, or the image(s) and conversation, of an earlier record:
training uses every record as often as it appears and warns the same; --allow-duplicates silences them),
truncated (trailing turns would be dropped to fit --model-max-length), absolute_image_path
(inside the image folder, so training accepts it, but the data breaks when the folder moves),
transparent_image (transparent pixels, composited onto white; `--image_background mean` in training
and generation uses the processor's mean colour). The image modes found are listed (RGB, RGBA, L, ...).

Token lengths use the project's `tokenize_conversation`, i.e. exactly what training sees.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

from llava_tiny.checks import Problem, check_samples, duplicate_problems

from .io import (DataToolError, add_allow_outside_argument, add_report_argument, check_output_path, cli_errors,
                 load_samples, sample_id, write_report, write_samples)
from .token_lengths import length_summary, load_tokenizer, measure_token_lengths



@dataclass
class ValidationResult:
    num_samples: int
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    token_lengths: dict | None = None
    image_modes: dict[str, int] = field(default_factory=dict)  # distinct decoded images per PIL mode

    @property
    def bad_indices(self) -> set[int]:
        return {issue.index for issue in self.errors}

    def counts(self, issues: list[Problem]) -> dict[str, int]:
        return dict(sorted(Counter(issue.kind for issue in issues).items()))


def _check_tokens(samples, valid: list[int], ids, tokenizer, template, model_max_length, num_image_tokens, workers,
                  file: str | None, result: ValidationResult) -> None:
    measured = measure_token_lengths(samples, valid, tokenizer, template, num_image_tokens, model_max_length, workers)
    for index, (kind, message) in measured.problems.items():
        result.errors.append(Problem(index, ids[index], kind, message, file))
    for index, dropped in measured.dropped_turns.items():
        turns = len(samples[index].get("conversations") or []) // 2
        cut = f"{dropped} of {turns} answer turn(s) would be dropped" if turns else "the text would be cut there"
        result.warnings.append(Problem(index, ids[index], "truncated",
                                       f"{measured.lengths[index]} tokens > model_max_length {model_max_length}: "
                                       f"{cut}", file))
    result.token_lengths = {"template": template, "num_image_tokens": num_image_tokens,
                            "model_max_length": model_max_length, **length_summary(measured.lengths.values()),
                            "truncated": len(measured.dropped_turns),
                            "lose_all_answers": sum(1 for kind, _ in measured.problems.values() if kind == "too_long")}


def validate_samples(samples: list[dict], image_folder: str | None = None, *, allow_outside: bool = False,
                     workers: int | None = None, allow_duplicates: bool = False, tokenizer=None,
                     template: str = "llava_v1", model_max_length: int | None = None,
                     num_image_tokens: int = 576, file: str | None = None) -> ValidationResult:
    """Check every sample with `llava_tiny.checks`; images are decoded (in parallel) when `image_folder` is given.

    Adds the checks across samples (ids; repeated records are warnings). With a `tokenizer` (already
    passed through `prepare_tokenizer`), token lengths are measured with `tokenize_conversation`
    and samples that `model_max_length` would truncate are reported.
    """
    result = ValidationResult(num_samples=len(samples))
    checked = check_samples(samples, file=file, image_folder=image_folder, allow_outside=allow_outside,
                            images="full" if image_folder else None, workers=workers)
    result.errors, result.warnings = checked.errors, checked.warnings
    result.image_modes = dict(Counter(f.mode for f in checked.images.values() if f.mode).most_common())
    ids = [sample_id(s, i) for i, s in enumerate(samples)]
    for index, sample in enumerate(samples):
        if sample.get("id") is None or sample.get("id") == "":
            result.errors.append(Problem(index, ids[index], "missing_id", "has no 'id'; expected a unique id per sample",
                                         file))
    if not allow_duplicates:
        result.warnings += duplicate_problems(samples, file)
    if tokenizer is not None:
        bad = result.bad_indices
        valid = [i for i in range(len(samples)) if i not in bad]
        _check_tokens(samples, valid, ids, tokenizer, template, model_max_length, num_image_tokens, workers, file,
                      result)
    result.errors.sort(key=lambda issue: issue.index)
    result.warnings.sort(key=lambda issue: issue.index)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="LLaVA JSON or JSONL file")
    parser.add_argument("--image-folder",
                        help="folder the image paths are relative to (images are not checked without it)")
    add_allow_outside_argument(parser)
    parser.add_argument("--workers", type=int,
                        help="threads decoding images (default 2 x CPUs, at most 32); "
                             "processes measuring token lengths (default: CPUs)")
    parser.add_argument("--allow-duplicates", action="store_true",
                        help="do not report repeated ids and samples (warnings: training uses them as they are)")
    parser.add_argument("--tokenizer", help="tokenizer folder: measure token lengths as training will")
    parser.add_argument("--version", default="llava_v1", help="conversation template (default llava_v1)")
    parser.add_argument("--model-max-length", type=int, help="report samples longer than this many tokens")
    parser.add_argument("--num-image-tokens", type=int, default=576,
                        help="placeholders per <image> (default 576: CLIP ViT-L/14 at 336px)")
    parser.add_argument("--write-clean", metavar="OUT", help="write the samples without errors to OUT")
    parser.add_argument("--max-listed", type=int, default=20, help="issues printed (all are in --report)")
    add_report_argument(parser)
    return parser


@cli_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_output_path(args.write_clean, [args.data])
    check_output_path(args.report, [args.data, args.write_clean])
    if args.model_max_length is not None and not args.tokenizer:
        raise DataToolError("--model-max-length needs --tokenizer (token lengths come from the tokenizer)")
    # Token lengths are measured in forked workers; the Rust tokenizer must not start threads first.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer(args.tokenizer, args.version) if args.tokenizer else None
    samples = load_samples(args.data)
    result = validate_samples(samples, args.image_folder, allow_outside=args.allow_images_outside_folder,
                              workers=args.workers, allow_duplicates=args.allow_duplicates, tokenizer=tokenizer,
                              template=args.version, model_max_length=args.model_max_length,
                              num_image_tokens=args.num_image_tokens, file=args.data)
    bad = result.bad_indices
    print(f"{args.data}: {len(samples)} samples, {len(samples) - len(bad)} valid, {len(bad)} with errors, "
          f"{len(result.warnings)} warnings"
          + ("" if args.image_folder else " (images not checked: no --image-folder)"))
    for kind, count in result.counts(result.errors).items():
        print(f"  error   {kind:22s} {count}")
    for kind, count in result.counts(result.warnings).items():
        print(f"  warning {kind:22s} {count}")
    if result.image_modes:
        print("  image modes: " + ", ".join(f"{mode} {count}" for mode, count in result.image_modes.items()))
    for issue in (result.errors + result.warnings)[: args.max_listed]:
        print(f"  {args.data}: sample {issue.sample_id!r} (record {issue.index}): {issue.kind}: {issue.message}")
    if result.token_lengths:
        t = result.token_lengths
        print(f"  tokens ({t['template']}): min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}"
              + (f"; {t['truncated']} truncated, {t['lose_all_answers']} lose every answer at {t['model_max_length']}"
                 if t["model_max_length"] else ""))
    report = {"data": args.data, "image_folder": args.image_folder, "num_samples": len(samples),
              "num_valid": len(samples) - len(bad), "errors_by_kind": result.counts(result.errors),
              "warnings_by_kind": result.counts(result.warnings), "image_modes": result.image_modes,
              "token_lengths": result.token_lengths,
              "errors": [asdict(e) for e in result.errors], "warnings": [asdict(w) for w in result.warnings]}
    if args.write_clean:
        write_samples(args.write_clean, [s for i, s in enumerate(samples) if i not in bad])
        reasons: dict[int, list[str]] = {}
        for issue in result.errors:
            reasons.setdefault(issue.index, []).append(f"{issue.kind}: {issue.message}")
        report["clean"] = {"path": args.write_clean, "written": len(samples) - len(bad),
                           "dropped": [{"index": i, "id": sample_id(samples[i], i), "reasons": r}
                                       for i, r in sorted(reasons.items())]}
        print(f"wrote {len(samples) - len(bad)} valid samples to {args.write_clean} (dropped {len(bad)})")
    write_report(args.report, report)
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
