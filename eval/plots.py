"""The plots of `eval.score`'s report: accuracy bars, the confusion matrix, the loss curve.

Plots are drawn on `matplotlib.figure.Figure` objects (the Agg canvas), never through pyplot, so
importing this module does not switch the backend of a notebook or a GUI session that uses it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from matplotlib.figure import Figure

from eval.overfitting import read_loss_history


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


def row_shares(counts: list[list[int]]) -> list[list[float]]:
    """Each row of a confusion matrix divided by its total (a row with no questions stays 0)."""
    return [[value / sum(row) if sum(row) else 0.0 for value in row] for row in counts]


def confusion_figure(matrix: Mapping) -> Figure:
    """Heatmap of `eval.looking.confusion_matrix` (rows: reference answer, columns: prediction), coloured by the
    share of each row, so a class with 10 questions reads as clearly as one with 7,000; the counts are written
    in the cells when the matrix is small enough to read them."""
    labels, columns, counts = matrix["labels"], matrix["columns"], matrix["counts"]
    shares = row_shares(counts)
    side = max(4.0, 0.45 * len(columns) + 2)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", aspect="auto", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the reference answer's questions")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted answer")
    ax.set_ylabel("reference answer")
    if len(columns) <= 15:
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                            color="white" if shares[i][j] > 0.5 else "black")
    ax.set_title("Confusion matrix (closed questions; colour: share of the row)")
    return fig


def plot_confusion_matrix(matrix: Mapping, path: str) -> str:
    """`confusion_figure` saved to `path`. Returns `path`."""
    confusion_figure(matrix).savefig(path, dpi=120)
    return path


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
