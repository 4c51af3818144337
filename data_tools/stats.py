"""Describe split files per split and per source: sizes, turns, answer and token lengths, types, the answer
distribution per question type (majority share) and, with --image-folder, image modes and sizes.

    python -m data_tools.stats --data data/sets/data_train.json data/sets/data_val.json \\
        data/sets/data_test.json --out-dir data/stats [--tokenizer DIR --version llava_v1]

Prints a markdown table; with --out-dir also writes stats.md and stats.png (histograms of answer
length in words and, with --tokenizer, of token length as training counts it; when most answers are
one word, bars of the most frequent answers per split).
"""
from __future__ import annotations

import argparse
import os
from collections import Counter

import numpy as np
from matplotlib.figure import Figure

from llava_tiny.checks import SampleChecks, check_samples

from .filter import UNKNOWN_SOURCE, SourceRule
from .image_tokens import (ImageTokenSettings, add_image_token_arguments, anyres_sample_lengths, image_size_summary,
                           image_tokens_text, settings_from_args)
from .io import add_report_argument, check_output_path, cli_errors, load_samples, sample_images, write_report
from .token_lengths import length_summary, load_tokenizer, measure_token_lengths

ALL_SOURCES = "(all)"
HISTOGRAM_BINS = 30
TOP_ANSWERS = 15  # bars in the top-answers panel of stats.png


def _answers(sample: dict) -> list[str]:
    turns = sample.get("conversations") or []
    return [t.get("value", "") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]


def answer_distribution(samples: list[dict], top: int = 5) -> dict:
    """Per question type: distinct answers, the most frequent ones and the majority answer's share (what always
    giving it would score: the bar a model must clear)."""
    by_type: dict[str, Counter] = {}
    for sample in samples:
        answers = _answers(sample)
        if answers:
            by_type.setdefault(str(sample.get("question_type", "(none)")), Counter())[answers[0].strip().lower()] += 1
    return {qtype: {"distinct": len(counts), "top": counts.most_common(top),
                    "majority_share": round(counts.most_common(1)[0][1] / sum(counts.values()), 4)}
            for qtype, counts in sorted(by_type.items())}


def image_summary(facts, settings: ImageTokenSettings) -> dict:
    """Modes and sizes of the distinct images (`llava_tiny.checks.ImageFacts`), problems counted, and the image
    tokens they would take (`image_tokens.image_size_summary`)."""
    good = [f for f in facts if f.problem is None]
    return {"images": len(good), "unreadable": len(facts) - len(good),
            "modes": dict(Counter(f.mode for f in good).most_common()),
            "sizes": {f"{w}x{h}": n for (w, h), n in Counter(f.size for f in good).most_common(5)},
            **image_size_summary([f.size for f in good], settings)}


def describe(samples: list[dict], token_lengths: dict[int, int] | None = None, indices=None,
             checked: SampleChecks | None = None, image_tokens: ImageTokenSettings = ImageTokenSettings(),
             num_image_tokens: int = 576) -> dict:
    """Counts, length summaries and answer distributions of `samples` (or of the ones at `indices`); image
    modes, sizes and image tokens when `checked` (`llava_tiny.checks.check_samples` of the same samples) is
    given, and with `token_lengths` (measured with `num_image_tokens` per image) too, the lengths under anyres
    when `image_tokens` has pinpoints."""
    indices = range(len(samples)) if indices is None else indices
    chosen = [samples[i] for i in indices]
    images = {p for s in chosen for p in sample_images(s) if isinstance(p, str)}
    answer_words = [len(a.split()) for s in chosen for a in _answers(s)]
    turns = [len(s.get("conversations") or []) // 2 for s in chosen]
    row = {
        "samples": len(chosen),
        "images": len(images),
        "text_only": sum(1 for s in chosen if not sample_images(s)),
        "turns": sum(turns),
        "turns_per_sample": round(sum(turns) / len(chosen), 2) if chosen else None,
        "answer_words": length_summary(answer_words),
        "answer_words_histogram": {str(n): c for n, c in sorted(Counter(answer_words).items())},
        "question_types": dict(Counter(str(s.get("question_type", "(none)")) for s in chosen).most_common()),
        "answer_types": dict(Counter(str(s.get("answer_type", "(none)")) for s in chosen).most_common()),
        "answers": answer_distribution(chosen),
    }
    if checked is not None:
        paths = {path for i in indices for path in checked.paths.get(i, [])}
        row["image_files"] = image_summary([checked.images[path] for path in sorted(paths)], image_tokens)
    if token_lengths is not None:
        row["tokens"] = length_summary([token_lengths[i] for i in indices if i in token_lengths])
    if token_lengths is not None and checked is not None and image_tokens.pinpoints:
        sizes = {path: facts.size for path, facts in checked.images.items() if facts.problem is None}
        chosen_lengths = {i: token_lengths[i] for i in indices if i in token_lengths}
        row["tokens_anyres"] = length_summary(anyres_sample_lengths(chosen_lengths, checked.paths, sizes, image_tokens,
                                                                    num_image_tokens).values())
    return row


def split_name(path: str) -> str:
    """`data/sets/data_train.json` -> `train`; other files keep their base name."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem[len("data_"):] if stem.startswith("data_") else stem


def _cell(summary: dict | None, keys=("mean", "p95", "max")) -> str:
    if not summary or summary.get("count") in (0, None):
        return "-"
    return " / ".join(str(summary[k]) for k in keys)


def markdown_table(stats: dict, with_tokens: bool) -> str:
    """One row per (split, source): the table printed and written to stats.md."""
    header = ["split", "source", "samples", "images", "text-only", "turns/sample", "answer words mean / p95 / max"]
    if with_tokens:
        header.append("tokens median / p95 / max")
    header.append("question types")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, per_source in stats.items():
        for source, row in per_source.items():
            cells = [split, source, row["samples"], row["images"], row["text_only"], row["turns_per_sample"],
                     _cell(row["answer_words"])]
            if with_tokens:
                cells.append(_cell(row.get("tokens"), ("median", "p95", "max")))
            types = ", ".join(f"{k} {v}" for k, v in list(row["question_types"].items())[:6])
            cells.append(types)
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def answers_text(stats: dict) -> str:
    """Per split: the majority answer's share per question type, and the image modes and sizes."""
    lines = []
    for split, per_source in stats.items():
        row = per_source[ALL_SOURCES]
        for qtype, answers in row["answers"].items():
            top = ", ".join(f"{answer} {count}" for answer, count in answers["top"])
            lines.append(f"{split} {qtype}: {answers['distinct']} distinct answers, majority share "
                         f"{answers['majority_share']:.2f} (top: {top})")
        if "image_files" in row:
            files = row["image_files"]
            modes = ", ".join(f"{mode} {n}" for mode, n in files["modes"].items())
            lines.append(f"{split} images: {files['images']} ({modes}; sizes {', '.join(files['sizes'])}; "
                         f"{files['unreadable']} unreadable)")
            lines.extend(image_tokens_text(split, files, row.get("tokens_anyres")))
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def _mostly_one_word(answer_words: dict[str, list[int]]) -> bool:
    lengths = [n for values in answer_words.values() for n in values]
    return sum(1 for n in lengths if n <= 1) > len(lengths) / 2


def stats_figure(answer_words: dict[str, list[int]], tokens: dict[str, list[int]] | None,
                 answers: dict[str, Counter]) -> Figure:
    """Histograms per split (answer words; token lengths when measured) and, when most answers are one word
    (a length histogram of one bar tells nothing), the most frequent answers as bars per split."""
    panels = [("answer length (words)", answer_words)] + ([("tokens per sample", tokens)] if tokens else [])
    with_top = _mostly_one_word(answer_words)
    figure = Figure(figsize=(6 * (len(panels) + with_top), 4), layout="constrained")
    axes = figure.subplots(1, len(panels) + with_top, squeeze=False)[0]
    for axis, (title, per_split) in zip(axes, panels):
        everything = [v for values in per_split.values() for v in values]
        if not everything:
            continue
        # Shared bins and per-split fractions, so splits of different sizes compare directly.
        low, high = min(everything), max(everything)
        bins = (np.arange(low, high + 2) - 0.5 if high - low < HISTOGRAM_BINS
                else np.histogram_bin_edges(everything, bins=HISTOGRAM_BINS))
        for split, values in per_split.items():
            if values:
                axis.hist(values, bins=bins, weights=np.full(len(values), 1 / len(values)), histtype="step",
                          linewidth=1.5, label=f"{split} ({len(values)})")
        axis.set_title(title)
        axis.set_ylabel("fraction of the split")
        axis.legend()
    if with_top:
        _plot_top_answers(axes[-1], answers)
    return figure


def _plot_top_answers(axis, answers: dict[str, Counter]) -> None:
    """Horizontal bars: the TOP_ANSWERS most frequent answers over all splits, the share of each split."""
    top = [answer for answer, _ in sum(answers.values(), Counter()).most_common(TOP_ANSWERS)]
    height = 0.8 / max(1, len(answers))
    for i, (split, counts) in enumerate(answers.items()):
        total = sum(counts.values()) or 1
        axis.barh([j - 0.4 + height * (i + 0.5) for j in range(len(top))], [counts[a] / total for a in top],
                  height=height, label=f"{split} ({total})")
    axis.set_yticks(range(len(top)), top)
    axis.invert_yaxis()  # the most frequent answer on top
    axis.set_title(f"top {len(top)} answers")
    axis.set_xlabel("fraction of the split")
    axis.legend()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools.stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, nargs="+", help="one or more LLaVA JSON/JSONL files (e.g. splits)")
    parser.add_argument("--source-rule", default="auto",
                        help="auto (the `source` field, else the image's first folder) | prefix | field:NAME | "
                             "regex:PATTERN (default auto)")
    parser.add_argument("--tokenizer", help="tokenizer folder: also measure token lengths as training will")
    parser.add_argument("--version", default="llava_v1", help="conversation template (default llava_v1)")
    parser.add_argument("--num-image-tokens", type=int, default=576, help="placeholders per <image> (default 576)")
    parser.add_argument("--image-folder", help="also report image modes (RGB, RGBA, L, ...) and sizes, read from "
                                               "the image headers, and the image tokens each takes under pad "
                                               "and (with --image-grid-pinpoints) anyres")
    add_image_token_arguments(parser)
    parser.add_argument("--out-dir", help="write stats.md and stats.png here")
    add_report_argument(parser)
    return parser


@cli_errors
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    outputs = [os.path.join(args.out_dir, n) for n in ("stats.md", "stats.png")] if args.out_dir else []
    for path in [*outputs, args.report]:
        check_output_path(path, args.data)
    rule = SourceRule.parse(args.source_rule)
    image_tokens = settings_from_args(args, parser)
    if args.tokenizer:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer(args.tokenizer, args.version) if args.tokenizer else None
    stats, words, answers, tokens = {}, {}, {}, ({} if tokenizer else None)
    for path in args.data:
        split = split_name(path) if split_name(path) not in stats else path
        samples = load_samples(path)
        lengths = None
        if tokenizer is not None:
            lengths = measure_token_lengths(samples, list(range(len(samples))), tokenizer, args.version,
                                            args.num_image_tokens).lengths
            tokens[split] = list(lengths.values())
        checked = check_samples(samples, image_folder=args.image_folder, images="header") if args.image_folder else None
        by_source: dict[str, list[int]] = {}
        for index, sample in enumerate(samples):
            by_source.setdefault(rule.source_of(sample) or UNKNOWN_SOURCE, []).append(index)
        described = dict(checked=checked, image_tokens=image_tokens, num_image_tokens=args.num_image_tokens)
        stats[split] = {ALL_SOURCES: describe(samples, lengths, **described)}
        if len(by_source) > 1:  # one source would repeat the (all) row
            for source in sorted(by_source):
                stats[split][source] = describe(samples, lengths, by_source[source], **described)
        words[split] = [len(a.split()) for s in samples for a in _answers(s)]
        answers[split] = Counter(a.strip().lower() for s in samples for a in _answers(s))
    table = markdown_table(stats, tokenizer is not None) + answers_text(stats)
    print(table, end="")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(outputs[0], "w", encoding="utf-8") as f:
            f.write(table)
        stats_figure(words, tokens, answers).savefig(outputs[1], dpi=100)
        print(f"wrote {outputs[0]} and {outputs[1]}")
    write_report(args.report, {"data": args.data, "source_rule": args.source_rule, "stats": stats})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
