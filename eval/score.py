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
`--blank-images`) adds the blind control and the majority-class baseline (the most frequent answer
per question type, from `--train-data` or else from the references) per question type, per answer
class and overall. Closed questions also get a per-answer accuracy table and a confusion matrix
(`confusion_matrix.png`); `--group-by FIELD` adds accuracy per value of any record field.

    python -m eval.score preds.jsonl --blind preds_blind.jsonl --train-data sets/data_train.json \
        --group-by label --out runs/mine/report
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping

from eval.caption_metrics import CAPTION_METRICS, score_captions
from eval.looking import accuracy_by, answer_class, blind_comparison, confusion_matrix, group_of, majority_answers
from eval.report import write_report
from eval.vqa_metrics import is_closed_question, score_vqa
from llava_tiny.data import load_samples

logger = logging.getLogger("eval.score")

TASKS = ("auto", "caption", "vqa")
CAPTION = "caption"
VQA = "vqa"


# --- inputs -----------------------------------------------------------------------------------

def load_predictions(path: str) -> list[dict]:
    """The records of a predictions JSONL file (blank lines ignored); errors name the bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg}); expected one object per line, "
                                 "as eval.generate writes") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
            records.append(record)
    return records


def _as_reference_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: references must be a string or a list of strings; found {json.dumps(value)[:120]}")


def load_references(path: str) -> dict[str, list[str]]:
    """References keyed by id (and, for COCO files, also by image file name) from one of three formats.

    - COCO captions: {"annotations": [{"image_id", "caption"}], "images": [{"id", "file_name"}]};
      keyed by str(image_id) and by file_name, so lines match on `id` or on their `image`'s name;
    - VQA annotations: {"annotations": [{"question_id", "answers": [{"answer"}, ...]}]};
    - a plain map {id: [reference, ...]} (or {id: reference}).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object (COCO/VQA annotation file or {{id: [refs]}}), "
                         f"found {type(data).__name__}")
    if "annotations" not in data:
        return {str(key): _as_reference_list(value, f"{path}[{key!r}]") for key, value in data.items()}

    refs: dict[str, list[str]] = {}
    for ann in data["annotations"]:
        if "caption" in ann and "image_id" in ann:
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        elif "answers" in ann and "question_id" in ann:
            refs[str(ann["question_id"])] = [a["answer"] for a in ann["answers"]]
        else:
            raise ValueError(f"{path}: annotation {json.dumps(ann)[:120]} has neither image_id+caption (COCO "
                             "captions) nor question_id+answers (VQA)")
    for image in data.get("images", []):
        if "file_name" in image and str(image.get("id")) in refs:
            refs.setdefault(image["file_name"], refs[str(image["id"])])
    return refs


def apply_references(records: list[dict], references: Mapping[str, list[str]]) -> list[dict]:
    """Copies of `records` whose `references` come from `references`, matched on `id`, then on the image name.

    Lines with no match keep their own references. Raises ValueError when no line matches at all
    (an id scheme mismatch, reported with an example from each side).
    """
    out, matched = [], 0
    for record in records:
        image = record.get("image")
        image = image[0] if isinstance(image, list) and image else image
        keys = [str(record.get("id"))] + ([os.path.basename(image)] if isinstance(image, str) and image else [])
        found = next((references[k] for k in keys if k in references), None)
        if found is not None:
            record = {**record, "references": _as_reference_list(found, f"references[{keys[0]!r}]")}
            matched += 1
        out.append(record)
    if records and references and not matched:
        raise ValueError(f"no prediction line matches the reference file: line ids look like "
                         f"{records[0].get('id')!r}, reference keys like {next(iter(references))!r}")
    logger.info("references from file for %d of %d lines", matched, len(records))
    return out


def task_of(record: dict, task: str = "auto") -> str:
    """The task of one record, "caption" or "vqa": `task` when not "auto", else from its fields.

    Auto rule: a caption when `question_type` or `task` is "caption" (any case), else VQA.
    """
    if task != "auto":
        return task
    labels = (record.get("question_type"), record.get("task"))
    return CAPTION if any(isinstance(v, str) and v.strip().lower() == CAPTION for v in labels) else VQA


def _kind_labelled(record: dict) -> bool:
    """Whether a line says its kind: a non-empty `question_type` or `task`."""
    return any(isinstance(record.get(k), str) and record[k].strip() for k in ("question_type", "task"))


UNLABELLED_NOTE = ("{n} of {total} lines have no `question_type` or `task`, so their kind (caption or VQA) is not "
                   "labelled: they are scored both as captions (BLEU, METEOR, ROUGE-L, CIDEr) and as VQA (accuracy). "
                   "Choose with `--task caption` or `--task vqa`, or give each line a `task` (\"caption\" or "
                   "\"vqa\") or a `question_type`.")


def _check_records(records: list[dict]) -> list[dict]:
    """Records with `references` as a list of strings; ValueError naming every malformed or duplicate id."""
    problems, seen, clean = [], set(), []
    for i, record in enumerate(records):
        rid = record.get("id")
        where = f"line {i + 1} (id {rid!r})"
        if rid is None:
            problems.append(f"{where}: no 'id'")
        elif str(rid) in seen:
            problems.append(f"{where}: id repeated")
        seen.add(str(rid))
        if not isinstance(record.get("prediction"), str):
            problems.append(f"{where}: 'prediction' must be a string, found {record.get('prediction')!r}")
        try:
            refs = _as_reference_list(record.get("references"), where)
        except ValueError as err:
            problems.append(str(err))
            continue
        if not refs:
            problems.append(f"{where}: no references (give them in the line or with --refs)")
        clean.append({**record, "references": refs})
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{len(problems)} problem(s) in the predictions:\n  {shown}{more}")
    return clean


# --- scoring ----------------------------------------------------------------------------------

def score_predictions(records: Iterable[dict], task: str = "auto",
                      references: Mapping[str, list[str]] | None = None, blind: Iterable[dict] | None = None,
                      train: list[dict] | None = None, group_by: Iterable[str] = ()) -> dict:
    """Metrics for prediction records (the lines of an `eval.generate` output).

    `task`: "auto" (per line, see `task_of`), "caption" or "vqa". `references`: optional
    {id or image file name: [reference, ...]} replacing the lines' own references.
    Returns a flat dict: caption metrics under pycocoevalcap's names (`Bleu_1`..`Bleu_4`, `METEOR`,
    `ROUGE_L`, `CIDEr`) plus `caption_tokenization`; VQA `vqa_accuracy`, `closed_accuracy`,
    `open_accuracy`, `per_question_type`, `per_source`; always `counts` and `skipped`
    ({metric or tool: why it was not computed as the toolkit would}). Lines with no `question_type` or
    `task` (with `task` "auto") count as both kinds; `task_unlabelled` then says so and how to choose.

    VQA questions also get `per_group` ({field: table} for each field of `group_by`) and, for closed
    questions, `per_answer` and `confusion_matrix` (`eval.looking`). With `blind` (the lines of a
    `--blank-images` run): `looking`, model vs blind vs majority class per question type, per answer
    and overall, with the majority answers from `train` (LLaVA samples) or else from the references.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    records = list(records)
    if not records:
        raise ValueError("no predictions to score")
    if references is not None:
        records = apply_references(records, references)
    records = _check_records(records)
    # Lines that do not say their kind are scored both ways: a caption file would otherwise get only VQA
    # exact match (0%), a VQA file only BLEU; `task_unlabelled` says so and how to choose.
    unlabelled = {id(r) for r in records if task == "auto" and not _kind_labelled(r)}
    captions = [r for r in records if task_of(r, task) == CAPTION or id(r) in unlabelled]
    questions = [r for r in records if task_of(r, task) == VQA]

    metrics: dict = {}
    counts = {"records": len(records), "caption": len(captions), "vqa": len(questions)}
    if unlabelled:
        counts["unlabelled"] = len(unlabelled)
        metrics["task_unlabelled"] = UNLABELLED_NOTE.format(n=len(unlabelled), total=len(records))
    skipped: dict[str, str] = {}
    if captions:
        result = score_captions({str(r["id"]): r["prediction"] for r in captions},
                                {str(r["id"]): r["references"] for r in captions})
        metrics.update({name: result["scores"][name] for name in CAPTION_METRICS if name in result["scores"]})
        metrics["caption_tokenization"] = result["tokenization"]
        skipped.update(result["skipped"])
    if questions:
        vqa = score_vqa(questions)
        counts.update(vqa.pop("counts"))
        metrics.update(vqa)
        metrics.update(_vqa_views(questions, blind, train, group_by))
    metrics["counts"] = counts
    metrics["skipped"] = skipped
    return metrics


def _vqa_views(questions: list[dict], blind: Iterable[dict] | None, train: list[dict] | None,
               group_by: Iterable[str]) -> dict:
    """Per-group and per-answer tables, the confusion matrix and the blind/majority comparison."""
    views: dict = {"per_group": {field: accuracy_by(questions, lambda r, f=field: group_of(r, f))
                                 for field in group_by}}
    closed = [q for q in questions if is_closed_question(q)]
    if closed:
        views["per_answer"] = accuracy_by(closed, answer_class)
        views["confusion_matrix"] = confusion_matrix(closed)
    if blind is not None:
        majority = majority_answers(questions, "question_type", train)
        views["looking"] = {**blind_comparison(questions, list(blind), majority),
                            "majority_answers": majority,
                            "majority_from": "training data" if train is not None else "the references scored"}
    return views


# --- trainer state ----------------------------------------------------------------------------

def _checkpoint_step(path: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", os.path.basename(os.path.dirname(path)))
    return int(match.group(1)) if match else -1


def find_trainer_state(model_dir: str) -> str | None:
    """`model_dir/trainer_state.json`, else the one in the highest-step `model_dir/checkpoint-N/`, else None."""
    direct = os.path.join(model_dir, "trainer_state.json")
    if os.path.isfile(direct):
        return direct
    found = glob.glob(os.path.join(glob.escape(model_dir), "checkpoint-*", "trainer_state.json"))
    found = [p for p in found if _checkpoint_step(p) >= 0]
    return max(found, key=_checkpoint_step) if found else None


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
                             "adds the blind control and the majority-class baseline")
    parser.add_argument("--train-data", "--train_data", default=None,
                        help="training split (LLaVA JSON): the majority answer per question type comes from it "
                             "(default: from the references scored)")
    parser.add_argument("--group-by", "--group_by", action="append", default=[], metavar="FIELD",
                        help="accuracy per value of this record field (e.g. label, source); repeatable")
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
    metrics["inputs"] = {"predictions": os.path.abspath(args.predictions),
                         "references": os.path.abspath(args.refs) if args.refs else None,
                         "trainer_state": os.path.abspath(trainer_state) if trainer_state else None,
                         "blind": os.path.abspath(args.blind) if args.blind else None,
                         "train_data": os.path.abspath(args.train_data) if args.train_data else None}
    written = write_report(metrics, out_dir, trainer_state_path=trainer_state)

    for name in CAPTION_METRICS:
        if name in metrics:
            print(f"{name}: {metrics[name]:.4f}")
    for name in ("vqa_accuracy", "closed_accuracy", "open_accuracy"):
        if metrics.get(name) is not None:
            print(f"{name}: {100 * metrics[name]:.2f}%")
    if "looking" in metrics:
        overall = metrics["looking"]["overall"]
        print(f"model {100 * overall['model']:.2f}%, blind control {100 * overall['blind']:.2f}%, "
              f"majority class {100 * overall['majority']:.2f}% (majority from {metrics['looking']['majority_from']})")
    for name, reason in metrics["skipped"].items():
        print(f"skipped {name}: {reason}")
    print(f"wrote {', '.join(sorted(written))} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
