"""Write what `eval.score` computed: metrics.json, report.md (the verdict first) and the plots (`eval.plots`)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

from eval.caption_metrics import CAPTION_METRICS
from eval.plots import plot_accuracy_bars, plot_confusion_matrix, plot_loss_curve
from eval.verdict import verdict_lines

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
QUESTION_TYPE_PLOT = "accuracy_by_question_type.png"
SOURCE_PLOT = "accuracy_by_source.png"
LOSS_PLOT = "loss_curve.png"
LOOKING_PLOT = "model_blind_majority.png"
CONFUSION_PLOT = "confusion_matrix.png"

VQA_RULE = ("Answers are compared after the official VQA normalization (punctuation, number words to digits, "
            "articles removed, lower case, contractions), applied to prediction and references alike. A question "
            "with exactly 10 reference answers gets the official soft accuracy (min(#matching annotators / 3, 1), "
            "averaged over the 10 leave-one-out subsets); any other question scores 1 when the prediction matches "
            "any reference, else 0. Closed = `answer_type` \"closed\" or \"yes/no\"; without an `answer_type`, "
            "closed = all references are yes/no.")


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _group_rows(table: Mapping[str, Mapping]) -> list[str]:
    return [f"| {name} | {_pct(row['accuracy'])} | {row['n']} |" for name, row in table.items()]


def _closed_and_group_sections(metrics: Mapping, plots: Mapping[str, str]) -> list[str]:
    lines = []
    # With a blind run the looking section holds these tables, the model's accuracy beside its baselines.
    per_group = {} if metrics.get("looking") else metrics.get("per_group") or {}
    for field, table in per_group.items():
        lines += [f"### Accuracy per {field}", "", f"| {field} | accuracy (%) | n |", "|---|---|---|",
                  *_group_rows(table), ""]
    if metrics.get("per_answer"):
        lines += ["### Accuracy per answer (closed questions)", "", "Questions grouped by their (normalized) "
                  "reference answer: how often the model gives each class.", "", "| answer | accuracy (%) | n |",
                  "|---|---|---|", *_group_rows(metrics["per_answer"]), ""]
    matrix = metrics.get("confusion_matrix")
    if matrix:
        lines += ["### Confusion matrix (closed questions)", "", "Rows: reference answer; columns: predicted answer "
                  "(normalized; `(other)`: any answer outside the classes).", "",
                  "| reference \\ predicted | " + " | ".join(matrix["columns"]) + " |",
                  "|---|" + "---|" * len(matrix["columns"])]
        lines += [f"| {label} | " + " | ".join(str(c) for c in row) + " |"
                  for label, row in zip(matrix["labels"], matrix["counts"])]
        if matrix.get("classes_left_out"):
            lines.append(f"\n{matrix['classes_left_out']} rarer classes are left out of the matrix.")
        lines.append("")
        if CONFUSION_PLOT in plots:
            lines += [f"![confusion matrix]({plots[CONFUSION_PLOT]})", ""]
    return lines


def _looking_section(metrics: Mapping, plots: Mapping[str, str]) -> list[str]:
    looking = metrics.get("looking")
    if not looking:
        return []
    has_prior = "prior" in looking["overall"]
    lines = ["## Is the model looking at the image?", "",
             "The same model with every image blanked (blind control), always answering the most frequent "
             f"answer of the question type (majority class, from {looking['majority_from']})"
             + (" and always answering the most frequent training answer of the exact question (question prior; "
                f"{looking['prior_seen']} of {looking['overall']['n']} questions were asked in training, the others "
                "get the majority class)" if has_prior else "")
             + ". A model that reads the picture beats them; a blind model above the majority class means the words "
             "of the question give the answer away. *Same* is the share of questions the model answers as its blind "
             "copy does; the verdict says whether the model beat its blind copy (by 5 points or more) or, when the "
             "two agree on most questions, answered from the words. A group whose questions all have one answer (each "
             "answer class; a label that names the answer) gets none: a blind copy that always gives that answer is "
             "right on all of it.", ""]
    runs = ("model", "blind", "majority") + (("prior",) if has_prior else ())
    header = " | ".join(f"{run} (%)" for run in runs)
    tables = [(key[len("by_"):].replace("_", " "), looking[key]) for key in looking
              if key.startswith("by_") and key != "by_answer"] + [("answer", looking["by_answer"])]
    for heading, table in tables:
        lines += [f"| {heading} | {header} | n | same (%) | verdict |", "|---|" + "---|" * (len(runs) + 3)]
        rows = list(table.items()) + ([("all", looking["overall"])] if heading == "question type" else [])
        lines += [f"| {name} | " + " | ".join(_pct(row[run]) for run in runs)
                  + f" | {row['n']} | {_pct(row['agreement'])} | {row['verdict'] or '– (one answer)'} |"
                  for name, row in rows]
        lines.append("")
    if LOOKING_PLOT in plots:
        lines += [f"![model vs blind vs baselines]({plots[LOOKING_PLOT]})", ""]
    return lines


def _caption_section(metrics: Mapping) -> list[str]:
    captions, n = metrics["captions"], metrics["counts"]["caption"]
    blind = "blind" in captions["overall"]
    lines = [f"## Captions ({n} images)", ""]
    if blind:
        lines += ["| metric | model | blind |", "|---|---|---|"]
        lines += [f"| {name} | {metrics[name]:.4f} | {captions['overall']['blind'][name]:.4f} |"
                  for name in CAPTION_METRICS if name in metrics]
    else:
        lines += ["| metric | score |", "|---|---|"]
        lines += [f"| {name} | {metrics[name]:.4f} |" for name in CAPTION_METRICS if name in metrics]
    lines += ["", f"Computed with pycocoevalcap's scorers. Tokenization: {metrics.get('caption_tokenization')}.", ""]
    for field, table in captions["per_group"].items():
        names = [name for name in CAPTION_METRICS if name in metrics]
        lines += [f"### Captions per {field}", "", "Each group scored on its own, as the toolkit scores a subset "
                  "(CIDEr's document frequencies from the group's references)"
                  + ("; each cell: model / blind." if blind else "."), "",
                  f"| {field} | n | " + " | ".join(names) + (" | same (%) | verdict |" if blind else " |"),
                  "|---|---|" + "---|" * (len(names) + (2 if blind else 0))]
        for value, row in table.items():
            cells = [f"{row['model'][k]:.4f}" + (f" / {row['blind'][k]:.4f}" if blind else "") for k in names]
            extra = f" | {_pct(row['agreement'])} | {row['verdict']}" if blind else ""
            lines.append(f"| {value} | {row['n']} | " + " | ".join(cells) + extra + " |")
        lines.append("")
    return lines


def _copying_section(metrics: Mapping) -> list[str]:
    copying = (metrics.get("captions") or {}).get("copying")
    rising = metrics.get("eval_loss_rising")
    if not copying and not rising:
        return []
    lines = ["## Copying and overfitting", ""]
    if copying:
        total = copying["captions"]
        rows = [("distinct predicted captions", copying["distinct_predictions"]),
                ("distinct blind captions", copying.get("blind_distinct_predictions")),
                ("equal to a training caption (word for word)", copying.get("equal_to_a_training_caption")),
                ("... of them equal to their own reference", copying.get("copied_and_right")),
                ("equal to their own reference", copying["equal_to_own_reference"])]
        lines += ["Captions compared word for word (case and punctuation ignored)"
                  + (f" with the {copying['training_captions']} distinct training captions." if "training_captions"
                     in copying else "; `--train-data` adds the comparison with the training captions."), "",
                  f"| captions ({total}) | n | share (%) |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {_pct(value / total if total else None)} |" for name, value in rows
                  if value is not None]
        lines.append("")
    if rising:
        lines += [f"**Warning:** {rising['warning']}", ""]
    return lines


def render_report(metrics: Mapping, plots: Mapping[str, str], notes: list[str] | None = None) -> str:
    """The report.md text for `metrics` (as `score_predictions` returns them) and the written plot files."""
    counts = metrics.get("counts", {})
    inputs = metrics.get("inputs", {})
    lines = ["# Evaluation report", ""]
    if inputs.get("predictions"):
        lines.append(f"Predictions: `{inputs['predictions']}`")
    if inputs.get("references"):
        lines.append(f"References from: `{inputs['references']}`")
    lines += [f"Records: {counts.get('records', 0)} ({counts.get('caption', 0)} captions, "
              f"{counts.get('vqa', 0)} VQA questions)", ""]
    if metrics.get("task_unlabelled"):
        lines += [f"**Kind not labelled.** {metrics['task_unlabelled']}", ""]
    verdict = verdict_lines(metrics)
    if verdict:
        lines += ["## Verdict", "", *[f"- {line}" for line in verdict], ""]

    if counts.get("caption"):
        lines += _caption_section(metrics)
    lines += _copying_section(metrics)

    if counts.get("vqa"):
        lines += [f"## VQA ({counts['vqa']} questions)", "", "| subset | accuracy (%) | n |", "|---|---|---|",
                  f"| all | {_pct(metrics['vqa_accuracy'])} | {counts['vqa']} |",
                  f"| closed | {_pct(metrics['closed_accuracy'])} | {counts.get('closed', 0)} |",
                  f"| open | {_pct(metrics['open_accuracy'])} | {counts.get('open', 0)} |", "",
                  VQA_RULE + f" Here: {counts.get('soft_accuracy_10_refs', 0)} questions scored with soft accuracy, "
                  f"{counts.get('exact_match', 0)} with exact match.", ""]
        for key, heading, plot in (("per_question_type", "question type", QUESTION_TYPE_PLOT),
                                   ("per_source", "source", SOURCE_PLOT)):
            if metrics.get(key):
                lines += [f"### Accuracy per {heading}", "", f"| {heading} | accuracy (%) | n |", "|---|---|---|",
                          *_group_rows(metrics[key]), ""]
                if plot in plots:
                    lines += [f"![accuracy per {heading}]({plots[plot]})", ""]

    lines += _closed_and_group_sections(metrics, plots)
    lines += _looking_section(metrics, plots)
    skipped = metrics.get("skipped") or {}
    if skipped:
        lines += ["## Skipped", "", "These were not computed as the COCO caption toolkit would:", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in skipped.items()]
        lines.append("")

    lines += ["## Training curve", ""]
    if LOSS_PLOT in plots:
        lines += [f"From `{inputs.get('trainer_state')}`.", "", f"![loss curve]({plots[LOSS_PLOT]})", ""]
    for note in notes or []:
        lines += [note, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(metrics: Mapping, out_dir: str, trainer_state_path: str | None = None) -> dict[str, str]:
    """Write metrics.json, report.md and the plots into `out_dir` (created if needed).

    Plots: accuracy per question type and per source (two or more of them; otherwise report.md says
    why there is none), the confusion matrix of closed questions, model vs blind vs majority (vs prior) (with
    a blind run; by question type, or by answer when there is one type), and the loss curve from
    `trainer_state_path` when given.
    Returns {file name: path} of everything written.
    """
    os.makedirs(out_dir, exist_ok=True)
    plots: dict[str, str] = {}
    notes: list[str] = []
    if len(metrics.get("per_question_type") or {}) > 1:
        plot_accuracy_bars({"accuracy": metrics["per_question_type"]}, os.path.join(out_dir, QUESTION_TYPE_PLOT))
        plots[QUESTION_TYPE_PLOT] = QUESTION_TYPE_PLOT
    elif metrics.get("counts", {}).get("vqa"):
        notes.append(f"No {QUESTION_TYPE_PLOT}: it compares question types, and the VQA records have "
                     f"{len(metrics.get('per_question_type') or {})} (a `question_type` field per record gives them).")
    if len(metrics.get("per_source") or {}) > 1:
        plot_accuracy_bars({"accuracy": metrics["per_source"]}, os.path.join(out_dir, SOURCE_PLOT),
                           title="Accuracy by source")
        plots[SOURCE_PLOT] = SOURCE_PLOT
    elif metrics.get("counts", {}).get("vqa"):
        notes.append(f"No {SOURCE_PLOT}: it compares sources, and the records have "
                     f"{len(metrics.get('per_source') or {})} (a `source` field per record gives them).")
    if metrics.get("confusion_matrix"):
        plot_confusion_matrix(metrics["confusion_matrix"], os.path.join(out_dir, CONFUSION_PLOT))
        plots[CONFUSION_PLOT] = CONFUSION_PLOT
    looking = metrics.get("looking")
    if looking:
        by_type = looking["by_question_type"]
        groups = by_type if len(by_type) > 1 else looking["by_answer"]
        names = {"model": "model", "blind": "blind control", "majority": "majority class", "prior": "question prior"}
        series = {name: {group: row[run] for group, row in groups.items()}
                  for run, name in names.items() if run in looking["overall"]}
        plot_accuracy_bars(series, os.path.join(out_dir, LOOKING_PLOT), title="Model vs " + ", ".join(list(series)[1:])
                           + ", by " + ("question type" if len(by_type) > 1 else "answer"))
        plots[LOOKING_PLOT] = LOOKING_PLOT
    if trainer_state_path:
        try:
            plot_loss_curve(trainer_state_path, os.path.join(out_dir, LOSS_PLOT))
            plots[LOSS_PLOT] = LOSS_PLOT
        except ValueError as err:
            notes.append(f"No loss curve: {err}.")
    else:
        notes.append("No loss curve: no trainer_state.json was given (`--trainer-state`) or found "
                     "(`--model-path`, or beside the predictions).")

    written = {name: os.path.join(out_dir, name) for name in plots}
    with open(os.path.join(out_dir, METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        f.write(render_report(metrics, plots, notes))
    written[METRICS_FILE] = os.path.join(out_dir, METRICS_FILE)
    written[REPORT_FILE] = os.path.join(out_dir, REPORT_FILE)
    return written
