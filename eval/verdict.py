"""What `eval.score`'s figures mean, in a few lines: printed on the terminal and at the top of report.md.

Per question type and per `--group-by` value, whether the model beat its blind copy or answered from
the words (`eval.looking.verdict`); the baselines beside the model; for captions the same on CIDEr,
and how much the model copies its training captions; a warning when the eval loss rose while the
training loss fell (`eval.overfitting.eval_loss_rising`).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from eval.caption_metrics import CAPTION_METRICS
from eval.looking import BEATS_BLIND

MAX_ROWS_NAMED = 8  # a table with more rows is summed up in one line (report.md has every row)
RECITES_SHARE = 0.5  # more than this share of captions are wrong copies of training ones: said in words too


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.1f}%)" if whole else "0"


def _row_line(name: str, row: Mapping, figure, noun: str = "answer") -> str:
    same = round(row["agreement"] * row["n"])
    return (f"{name}: {row['verdict']} ({figure(row, 'model')} vs blind {figure(row, 'blind')}; the same {noun} as "
            f"blind on {same} of {row['n']})")


def _table_lines(heading: str, table: Mapping[str, Mapping], figure, noun: str = "answer") -> list[str]:
    """One line per row, or, for a long table, the verdicts counted and the rows that did not beat blind named.
    Rows without a verdict (one answer in the group) are left out."""
    table = {name: row for name, row in table.items() if row["verdict"] is not None}
    if not table:
        return []
    if len(table) <= MAX_ROWS_NAMED:
        return [_row_line(f"{heading} {name}", row, figure, noun) for name, row in table.items()]
    verdicts = Counter(row["verdict"] for row in table.values())
    behind = [name for name, row in table.items() if row["verdict"] != BEATS_BLIND]
    named = ", ".join(behind[:MAX_ROWS_NAMED]) + (", ..." if len(behind) > MAX_ROWS_NAMED else "")
    counted = "; ".join(f"{n} {v}" for v, n in verdicts.most_common())
    return [f"{heading}: {counted}" + (f" (not beating it: {named})" if behind else "")]


def _accuracy(row: Mapping, run: str) -> str:
    return _pct(row[run])


def _cider(row: Mapping, run: str) -> str:
    return f"{row[run]['CIDEr']:.3f}"


def caption_lines(metrics: Mapping) -> list[str]:
    """Captions: the verdict on CIDEr (overall, per group) and the copying figures."""
    captions = metrics.get("captions")
    if not captions:
        return []
    lines = []
    if "verdict" in captions["overall"]:
        lines.append(_row_line("captions (CIDEr)", captions["overall"], _cider, "caption"))
        for field, table in captions["per_group"].items():
            lines += _table_lines(f"captions (CIDEr), {field}", table, _cider, "caption")
    copying, total = captions["copying"], captions["copying"]["captions"]
    text = "copying: "
    if "equal_to_a_training_caption" in copying:
        copied, right = copying["equal_to_a_training_caption"], copying["copied_and_right"]
        # Copies that are right are fine (a set whose captions repeat); copies of other images' captions are not.
        text += (f"{_share(copied, total)} predicted captions are training captions word for word ({right} of them "
                 "right)" + (": the model recites its training set" if copied - right > RECITES_SHARE * total else "")
                 + "; ")
    text += f"{copying['distinct_predictions']} distinct captions for {total} images"
    if "blind_distinct_predictions" in copying:
        text += f" (blind: {copying['blind_distinct_predictions']})"
    lines.append(text + f"; {_share(copying['equal_to_own_reference'], total)} equal their own reference")
    return lines


def looking_lines(metrics: Mapping) -> list[str]:
    """VQA: the model beside its baselines overall, then the verdict per question type and per group."""
    looking = metrics.get("looking")
    if not looking:
        return []
    overall = looking["overall"]
    prior = f", question prior {_pct(overall['prior'])}" if "prior" in overall else ""
    lines = [f"model {_pct(overall['model'])}, blind control {_pct(overall['blind'])}, majority class "
             f"{_pct(overall['majority'])}{prior} (majority from {looking['majority_from']})"]
    if len(looking["by_question_type"]) > 1:
        lines += _table_lines("question type", looking["by_question_type"], _accuracy)
    elif overall["verdict"] is not None:
        lines.append(_row_line("all questions", overall, _accuracy))
    for field in metrics.get("per_group") or {}:
        if field != "question_type":
            lines += _table_lines(field, looking[f"by_{field}"], _accuracy)
    return lines


def verdict_lines(metrics: Mapping) -> list[str]:
    """The verdict: captions, VQA, and the eval-loss warning (empty when there is nothing to judge)."""
    lines = caption_lines(metrics) + looking_lines(metrics)
    if metrics.get("eval_loss_rising"):
        lines.append("warning: " + metrics["eval_loss_rising"]["warning"])
    return lines


def terminal_lines(metrics: Mapping) -> list[str]:
    """What `python -m eval.score` prints: every caption metric (beside the blind copy's), VQA accuracy, the
    verdict, and what was skipped."""
    blind = (metrics.get("captions") or {}).get("overall", {}).get("blind", {})
    lines = [f"{name}: {metrics[name]:.4f}" + (f" (blind {blind[name]:.4f})" if name in blind else "")
             for name in CAPTION_METRICS if name in metrics]
    lines += [f"{name}: {_pct(metrics[name])}" for name in ("vqa_accuracy", "closed_accuracy", "open_accuracy")
              if metrics.get(name) is not None]
    lines += verdict_lines(metrics)
    lines += [f"skipped {name}: {reason}" for name, reason in metrics["skipped"].items()]
    return lines
