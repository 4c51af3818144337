"""Score a predictions file written by `eval.generate`; write metrics.json, report.md and plots.

    python -m eval.score runs/lora/preds.jsonl --out runs/lora/report
    python -m eval.score preds.jsonl --refs captions_val.json --model-path runs/lora

Each line is one question: `id`, `prediction`, `references` (list of strings), and optionally
`answer_type`, `question_type`, `source`. With `--task auto` (the default) a line is a caption
when its `question_type` or `task` is "caption" (any case) and a VQA question otherwise, and a
line with neither field is scored both ways (metrics.json and report.md say so);
`--task caption` or `--task vqa` treats every line as that task.

Captions get BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap (the COCO caption toolkit);
VQA questions get VQA accuracy (see `eval.vqa_metrics`). `--refs` supplies references from a
COCO captions file, a VQA annotations file, or a JSON map {id: [reference, ...]}; a line found
there has its own `references` replaced.

Is the model looking at the image? `--blind PREDS_BLIND.jsonl` (the same questions generated with
`--blank-images`) adds the blind control beside the model: for VQA with the majority class (the most
frequent answer per question type, from `--train-data` or else from the references) and, with
`--train-data`, the question prior (the most frequent training answer of the exact question), per
question type, per `--group-by` value, per answer class and overall; for captions every metric of
the blind copy, overall and per `--group-by` value. Each row gets a verdict: beat its blind copy,
answered from the words (trained and blind agree on most items), or neither. Closed questions also
get a per-answer table and a confusion matrix (`confusion_matrix.png`).

Is it reciting its training set? Captions get copying figures (distinct predictions; with
`--train-data`, those that are a training caption word for word), and a trainer_state.json whose
eval loss rose while the training loss fell gets a warning naming the best step.

    python -m eval.score preds.jsonl --blind preds_blind.jsonl --train-data sets/data_train.json \
        --group-by label --out runs/mine/report
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Mapping

from eval.caption_metrics import score_caption_runs
from eval.inputs import (CAPTION, TASKS, UNLABELLED_NOTE, VQA, apply_references, check_records, kind_labelled,
                         load_predictions, load_references, task_of)
from eval.looking import (accuracy_by, answer_class, blind_comparison, confusion_matrix, group_of, majority_answers,
                          match_blind, question_prior_answers, verdict)
from eval.overfitting import caption_copying, eval_loss_rising, find_trainer_state, read_loss_history, same_words
from eval.report import write_report
from eval.verdict import terminal_lines
from eval.vqa_metrics import is_closed_question, score_vqa
from llava_tiny.data import load_samples

logger = logging.getLogger("eval.score")


# --- scoring ----------------------------------------------------------------------------------

def score_predictions(records: Iterable[dict], task: str = "auto",
                      references: Mapping[str, list[str]] | None = None, blind: Iterable[dict] | None = None,
                      train: list[dict] | None = None, group_by: Iterable[str] = ()) -> dict:
    """Metrics for prediction records (the lines of an `eval.generate` output).

    `task`: "auto" (per line, see `task_of`), "caption" or "vqa". `references`: optional
    {id or image file name: [reference, ...]} replacing the lines' own references.
    Returns a flat dict: caption metrics under pycocoevalcap's names (`Bleu_1`..`Bleu_4`, `METEOR`,
    `ROUGE_L`, `CIDEr`) plus `caption_tokenization` and `captions` (see `_caption_views`); VQA
    `vqa_accuracy`, `closed_accuracy`, `open_accuracy`, `per_question_type`, `per_source`; always `counts`
    and `skipped` ({metric or tool: why it was not computed as the toolkit would}). Lines with no
    `question_type` or `task` (with `task` "auto") count as both kinds; `task_unlabelled` then says so.

    VQA questions also get `per_group` ({field: table} for each field of `group_by`) and, for closed
    questions, `per_answer` and `confusion_matrix` (`eval.looking`). With `blind` (the lines of a
    `--blank-images` run): `looking`, model vs blind vs majority class (vs question prior, with `train`)
    per question type, per `group_by` field, per answer and overall, each row with its verdict; the
    majority answers come from `train` (LLaVA samples) or else from the references.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    records = list(records)
    if not records:
        raise ValueError("no predictions to score")
    if references is not None:
        records = apply_references(records, references)
    records = check_records(records)
    blind = list(blind) if blind is not None else None
    group_by = list(group_by)
    # Lines that do not say their kind are scored both ways: a caption file would otherwise get only VQA
    # exact match (0%), a VQA file only BLEU; `task_unlabelled` says so and how to choose.
    unlabelled = {id(r) for r in records if task == "auto" and not kind_labelled(r)}
    captions = [r for r in records if task_of(r, task) == CAPTION or id(r) in unlabelled]
    questions = [r for r in records if task_of(r, task) == VQA]

    metrics: dict = {}
    counts = {"records": len(records), "caption": len(captions), "vqa": len(questions)}
    if unlabelled:
        counts["unlabelled"] = len(unlabelled)
        metrics["task_unlabelled"] = UNLABELLED_NOTE.format(n=len(unlabelled), total=len(records))
    skipped: dict[str, str] = {}
    if captions:
        views = _caption_views(captions, blind, train, group_by)
        skipped.update(views.pop("skipped"))
        metrics.update(views)
    if questions:
        vqa = score_vqa(questions)
        counts.update(vqa.pop("counts"))
        metrics.update(vqa)
        metrics.update(_vqa_views(questions, blind, train, group_by))
    metrics["counts"] = counts
    metrics["skipped"] = skipped
    return metrics


def _caption_views(captions: list[dict], blind: list[dict] | None, train: list[dict] | None,
                   group_by: list[str]) -> dict:
    """Caption metrics of the model (top-level keys) and `captions`: {"overall": row, "per_group": {field:
    {value: row}}, "copying": `eval.overfitting.caption_copying`}, a row holding {"model": {metric: value},
    "n"} and, with `blind`, "blind" (the same metrics), "agreement" (same words) and "verdict" (on CIDEr)."""
    ids = [str(r["id"]) for r in captions]
    runs = {"model": {key: r["prediction"] for key, r in zip(ids, captions)}}
    blind_predictions = None
    if blind is not None:
        blind_predictions = [b["prediction"] for b in match_blind(captions, blind)]
        runs["blind"] = dict(zip(ids, blind_predictions))
    groups: dict[tuple[str, str], list[str]] = {("", "all"): ids}
    for field in group_by:
        for key, record in sorted(zip(ids, captions), key=lambda pair: group_of(pair[1], field)):
            groups.setdefault((field, group_of(record, field)), []).append(key)
    result = score_caption_runs(runs, {key: r["references"] for key, r in zip(ids, captions)}, groups)

    def row(group: tuple[str, str]) -> dict:
        out = {**result["scores"][group], "n": len(groups[group])}
        if blind is not None:
            out["agreement"] = sum(same_words(runs["model"][k]) == same_words(runs["blind"][k])
                                   for k in groups[group]) / len(groups[group])
            out["verdict"] = verdict(out["model"]["CIDEr"], out["blind"]["CIDEr"], out["agreement"])
        return out

    per_group: dict[str, dict] = {field: {} for field in group_by}
    for field, value in groups:
        if field:
            per_group[field][value] = row((field, value))
    model = result["scores"][("", "all")]["model"]
    return {**model, "caption_tokenization": result["tokenization"], "skipped": result["skipped"],
            "captions": {"overall": row(("", "all")), "per_group": per_group,
                         "copying": caption_copying(captions, blind_predictions, train)}}


def _vqa_views(questions: list[dict], blind: list[dict] | None, train: list[dict] | None,
               group_by: list[str]) -> dict:
    """Per-group and per-answer tables, the confusion matrix and the blind/majority/prior comparison."""
    views: dict = {"per_group": {field: accuracy_by(questions, lambda r, f=field: group_of(r, f))
                                 for field in group_by}}
    closed = [q for q in questions if is_closed_question(q)]
    if closed:
        views["per_answer"] = accuracy_by(closed, answer_class)
        views["confusion_matrix"] = confusion_matrix(closed)
    if blind is not None:
        majority = majority_answers(questions, "question_type", train)
        prior = question_prior_answers(train) if train is not None else None
        views["looking"] = {**blind_comparison(questions, blind, majority, prior=prior, group_by=group_by),
                            "majority_answers": majority,
                            "majority_from": "training data" if train is not None else "the references scored"}
    return views


# --- command line -----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="predictions JSONL from eval.generate")
    parser.add_argument("--refs", default=None,
                        help="COCO captions / VQA annotation JSON, or {id: [refs]}; replaces the lines' own references")
    parser.add_argument("--out", default=None,
                        help="report folder (default: <predictions folder>/<predictions name>_report)")
    parser.add_argument("--task", choices=TASKS, default="auto",
                        help="caption, vqa, or auto: caption when question_type or task is 'caption', both ways "
                             "when a line has neither (default)")
    parser.add_argument("--trainer-state", "--trainer_state", default=None,
                        help="trainer_state.json for the loss curve (default: found under --model-path)")
    parser.add_argument("--model-path", "--model_path", default=None,
                        help="model folder to look for trainer_state.json in (default: the predictions' folder)")
    parser.add_argument("--blind", default=None, metavar="PREDS_BLIND.jsonl",
                        help="predictions of the same questions with blank images (eval.generate --blank-images): "
                             "adds the blind control (captions and VQA) and the majority-class baseline")
    parser.add_argument("--train-data", "--train_data", default=None,
                        help="training split (LLaVA JSON): the majority answer per question type and the question "
                             "prior come from it (default: majority from the references scored, no prior), and "
                             "captions are checked for copies of its captions")
    parser.add_argument("--group-by", "--group_by", action="append", default=[], metavar="FIELD",
                        help="accuracy, caption metrics and verdicts per value of this record field (e.g. label, "
                             "source); repeatable")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pred_dir = os.path.dirname(os.path.abspath(args.predictions))
    out_dir = args.out or os.path.join(pred_dir, os.path.splitext(os.path.basename(args.predictions))[0] + "_report")
    trainer_state = args.trainer_state
    if trainer_state is None:
        trainer_state = find_trainer_state(args.model_path or pred_dir)
    elif not os.path.isfile(trainer_state):
        raise SystemExit(f"--trainer-state {trainer_state}: no such file")

    try:
        records = load_predictions(args.predictions)
        references = load_references(args.refs) if args.refs else None
        blind = load_predictions(args.blind) if args.blind else None
        train = load_samples(args.train_data) if args.train_data else None
        metrics = score_predictions(records, task=args.task, references=references, blind=blind, train=train,
                                    group_by=args.group_by)
    except (OSError, ValueError) as err:
        raise SystemExit(f"eval.score: {err}") from None
    if trainer_state:
        try:
            rising = eval_loss_rising(*read_loss_history(trainer_state))
        except (OSError, ValueError) as err:  # the loss curve's note in report.md says what is wrong with the file
            logger.warning("%s: no loss trend read (%s)", trainer_state, err)
            rising = None
        if rising:
            metrics["eval_loss_rising"] = rising
    metrics["inputs"] = {"predictions": os.path.abspath(args.predictions),
                         "references": os.path.abspath(args.refs) if args.refs else None,
                         "trainer_state": os.path.abspath(trainer_state) if trainer_state else None,
                         "blind": os.path.abspath(args.blind) if args.blind else None,
                         "train_data": os.path.abspath(args.train_data) if args.train_data else None}
    written = write_report(metrics, out_dir, trainer_state_path=trainer_state)
    print("\n".join(terminal_lines(metrics)))
    print(f"wrote {', '.join(sorted(written))} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
