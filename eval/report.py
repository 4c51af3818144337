"""Write what `eval.score` computed: metrics.json, report.md and PNG plots.

Plots are drawn on `matplotlib.figure.Figure` objects (the Agg canvas), never through pyplot, so
importing this module does not switch the backend of a notebook or a GUI session that uses it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

from matplotlib.figure import Figure

from eval.caption_metrics import CAPTION_METRICS

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


def _accuracy_value(value) -> float | None:
    """A table cell given as a number or as {"accuracy": x, "n": k} (the shape metrics.json uses)."""
    if isinstance(value, Mapping):
        value = value.get("accuracy")
    return None if value is None else float(value)


def plot_accuracy_bars(tables: Mapping[str, Mapping], path: str, title: str = "Accuracy by question type",
                       ylabel: str = "accuracy") -> str:
    """Grouped bar chart: one group per category, one bar per series, side by side.

    `tables` maps a series label (e.g. "model", "blind", "majority class") to {category: accuracy};
    an accuracy may be a number or {"accuracy": x, "n": k} as in metrics.json's `per_question_type`.
    A category missing from a series gets no bar (a gap, not a zero). Returns `path`.
    """
    if not tables:
        raise ValueError("plot_accuracy_bars needs at least one series; got an empty dict")
    categories: list[str] = []
    for table in tables.values():
        categories += [c for c in table if c not in categories]
    series = list(tables.items())
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 0.25 + len(categories) * (0.35 + 0.25 * len(series))), 4.5),
                 layout="constrained")
    ax = fig.subplots()
    top = 1.0
    for i, (label, table) in enumerate(series):
        xs, heights = [], []
        for j, category in enumerate(categories):
            acc = _accuracy_value(table.get(category))
            if acc is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                heights.append(acc)
        bars = ax.bar(xs, heights, width=width * 0.95, label=str(label))
        if len(categories) * len(series) <= 40:
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        top = max([top, *heights])
    ax.set_xticks(range(len(categories)))
    crowded = len(categories) > 4
    ax.set_xticklabels(categories, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.savefig(path, dpi=120)
    return path


def plot_confusion_matrix(matrix: Mapping, path: str) -> str:
    """Heatmap of `eval.looking.confusion_matrix` (rows: reference answer, columns: prediction), counts written
    in the cells when the matrix is small enough to read them. Returns `path`."""
    labels, columns, counts = matrix["labels"], matrix["columns"], matrix["counts"]
    side = max(4.0, 0.45 * len(columns) + 2)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, label="questions")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted answer")
    ax.set_ylabel("reference answer")
    if len(columns) <= 15:
        top = max((max(row) for row in counts), default=0)
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if value > top / 2 else "black")
    ax.set_title("Confusion matrix (closed questions)")
    fig.savefig(path, dpi=120)
    return path


def read_loss_history(trainer_state_path: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train, eval) lists of (step, loss) from a Hugging Face `trainer_state.json`'s `log_history`."""
    with open(trainer_state_path, encoding="utf-8") as f:
        history = json.load(f).get("log_history", [])
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    return train, evals


def plot_loss_curve(trainer_state_path: str, path: str) -> str:
    """Training loss (and eval loss, when logged) against step from a `trainer_state.json`. Returns `path`.

    Raises ValueError when the file's `log_history` has no `loss` and no `eval_loss` entry.
    """
    train, evals = read_loss_history(trainer_state_path)
    if not train and not evals:
        raise ValueError(f"{trainer_state_path}: log_history has no 'loss' or 'eval_loss' entries with a 'step'")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss (" + os.path.basename(os.path.dirname(os.path.abspath(trainer_state_path))) + ")")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _group_rows(table: Mapping[str, Mapping]) -> list[str]:
    return [f"| {name} | {_pct(row['accuracy'])} | {row['n']} |" for name, row in table.items()]


def _closed_and_group_sections(metrics: Mapping, plots: Mapping[str, str]) -> list[str]:
    lines = []
    for field, table in (metrics.get("per_group") or {}).items():
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
    lines = ["## Is the model looking at the image?", "",
             "The same model with every image blanked (blind control) and always answering the most frequent "
             f"answer of the question type (majority class, from {looking['majority_from']}). A model that reads "
             "the picture beats both; a blind model above the majority class means the words of the question "
             "give the answer away.", ""]
    for key, heading in (("by_question_type", "question type"), ("by_answer", "answer")):
        lines += [f"| {heading} | model (%) | blind (%) | majority (%) | n |", "|---|---|---|---|---|"]
        rows = list(looking[key].items()) + ([("all", looking["overall"])] if key == "by_question_type" else [])
        lines += [f"| {name} | {_pct(row['model'])} | {_pct(row['blind'])} | {_pct(row['majority'])} | {row['n']} |"
                  for name, row in rows]
        lines.append("")
    if LOOKING_PLOT in plots:
        lines += [f"![model vs blind vs majority]({plots[LOOKING_PLOT]})", ""]
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

    if counts.get("caption"):
        lines += [f"## Captions ({counts['caption']} images)", "", "| metric | score |", "|---|---|"]
        lines += [f"| {name} | {metrics[name]:.4f} |" for name in CAPTION_METRICS if name in metrics]
        lines += ["", f"Computed with pycocoevalcap's scorers. Tokenization: {metrics.get('caption_tokenization')}.",
                  ""]

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
    why there is none), the confusion matrix of closed questions, model vs blind vs majority (with a
    blind run; by question type, or by answer when there is one type), and the loss curve from
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
        series = {name: {group: row[name] for group, row in groups.items()} for name in ("model", "blind", "majority")}
        plot_accuracy_bars(series, os.path.join(out_dir, LOOKING_PLOT), title="Model vs blind control vs majority "
                           "class, by " + ("question type" if len(by_type) > 1 else "answer"))
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
