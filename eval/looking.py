"""Is the model looking at the image? Baselines and per-class views of VQA predictions.

- the **blind control**: the same model with every image blanked (`eval.generate --blank-images`);
- the **majority class**: always giving the most frequent answer of the question's type (from the
  training split when given, else from the references being scored);
- per answer class: accuracy, and a confusion matrix (reference answer x predicted answer).

A model that reads the picture beats both baselines; a blind model that beats the majority class
means the answers leak through the words of the question. Answers are compared after the official
VQA normalization (`vqa_metrics.normalize_vqa_answer`), exactly as `vqa_accuracy` scores them.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from eval.vqa_metrics import MISSING_GROUP, normalize_vqa_answer, vqa_accuracy

OTHER_ANSWER = "(other)"  # confusion-matrix column for predictions outside the reference answers
MAX_CONFUSION_LABELS = 30  # more classes than this make an unreadable matrix: the most frequent are kept


def group_of(record: dict, field: str) -> str:
    """The record's value of `field` as a table row name (`(none)` when missing)."""
    value = record.get(field)
    return MISSING_GROUP if value in (None, "") else str(value)


def answer_class(record: dict) -> str:
    """The class of a question: its first reference answer, normalized."""
    return normalize_vqa_answer(record["references"][0])


def _training_answer(sample: dict) -> str | None:
    turns = sample.get("conversations") or []
    answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
    return answers[0] if answers and isinstance(answers[0], str) else None


def majority_answers(records: list[dict], field: str = "question_type", train: list[dict] | None = None) -> dict:
    """{group of `field`: the most frequent normalized answer}: from the `train` samples (LLaVA records, first
    answer) when given, else from the first reference of `records`. Ties go to the answer seen first."""
    counts: dict[str, Counter] = defaultdict(Counter)
    if train is not None:
        for sample in train:
            answer = _training_answer(sample)
            if answer is not None:
                counts[group_of(sample, field)][normalize_vqa_answer(answer)] += 1
    else:
        for record in records:
            counts[group_of(record, field)][answer_class(record)] += 1
    return {group: counter.most_common(1)[0][0] for group, counter in counts.items()}


def _accuracy(records: list[dict]) -> float | None:
    return sum(vqa_accuracy(r["prediction"], r["references"]) for r in records) / len(records) if records else None


def accuracy_by(records: list[dict], key) -> dict[str, dict]:
    """{group: {"accuracy", "n"}} with groups from `key(record)`, sorted by name."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return {name: {"accuracy": _accuracy(rows), "n": len(rows)} for name, rows in sorted(groups.items())}


def blind_comparison(records: list[dict], blind: list[dict], majority: dict[str, str],
                     field: str = "question_type") -> dict:
    """Model vs blind control vs majority class, per group of `field`, per answer class and overall.

    `blind` holds the blind run's lines; they are matched to `records` by `id` (every id must be there).
    Returns {"by_<field>": {group: {"model", "blind", "majority", "n"}}, "by_answer": {...}, "overall": {...}}.
    """
    blind_by_id = {str(r["id"]): r for r in blind}
    missing = [str(r["id"]) for r in records if str(r["id"]) not in blind_by_id]
    if missing:
        raise ValueError(f"the blind predictions lack {len(missing)} of the {len(records)} question ids "
                         f"(e.g. {missing[:3]}); expected a blind run of the same questions")
    runs = {"model": records,
            "blind": [dict(r, prediction=blind_by_id[str(r["id"])]["prediction"]) for r in records],
            "majority": [dict(r, prediction=majority.get(group_of(r, field), "")) for r in records]}

    def table(key) -> dict[str, dict]:
        tables = {name: accuracy_by(rows, key) for name, rows in runs.items()}
        return {group: {**{name: tables[name][group]["accuracy"] for name in runs}, "n": row["n"]}
                for group, row in tables["model"].items()}

    return {f"by_{field}": table(lambda r: group_of(r, field)), "by_answer": table(answer_class),
            "overall": table(lambda r: "all")["all"]}


def confusion_matrix(records: list[dict]) -> dict:
    """Counts of (reference answer, predicted answer) over closed questions, both normalized.

    Rows and columns are the answer classes (the most frequent MAX_CONFUSION_LABELS when there are more);
    a prediction outside them counts in the last column, `(other)`.
    """
    truth = [answer_class(r) for r in records]
    labels = [label for label, _ in Counter(truth).most_common(MAX_CONFUSION_LABELS)]
    labels.sort()
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * (len(labels) + 1) for _ in labels]
    for record, label in zip(records, truth):
        if label in index:
            predicted = normalize_vqa_answer(record["prediction"])
            counts[index[label]][index.get(predicted, len(labels))] += 1
    return {"labels": labels, "columns": [*labels, OTHER_ANSWER], "counts": counts,
            "classes_left_out": len(set(truth)) - len(labels)}
