"""Is the model looking at the image? Baselines and per-class views of VQA predictions.

- the **blind control**: the same model with every image blanked (`eval.generate --blank-images`);
- the **majority class**: always giving the most frequent answer of the question's type (from the
  training split when given, else from the references being scored);
- the **question prior**: always giving the most frequent training answer of the exact question
  string (what the words alone can give; questions never asked in training get the majority class);
- per answer class: accuracy, and a confusion matrix (reference answer x predicted answer).

A model that reads the picture beats both baselines; a blind model that beats the majority class
means the answers leak through the words of the question. Each row gets a verdict (`verdict`): the
model beat its blind copy, or it answered from the words (trained and blind give the same answer on
most items), or neither. Answers are compared after the official VQA normalization
(`vqa_metrics.normalize_vqa_answer`), exactly as `vqa_accuracy` scores them.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from eval.vqa_metrics import MISSING_GROUP, normalize_vqa_answer, vqa_accuracy

OTHER_ANSWER = "(other)"  # confusion-matrix column for predictions outside the reference answers
MAX_CONFUSION_LABELS = 30  # more classes than this make an unreadable matrix: the most frequent are kept
BEATS_BLIND_MARGIN = 0.05  # accuracy (or CIDEr) the model must gain over its blind copy; less is noise on small sets
FROM_WORDS_AGREEMENT = 0.5  # trained and blind give the same answer on more than this share: "most items"
BEATS_BLIND, FROM_THE_WORDS, NO_BETTER = ("beat its blind copy", "answered from the words",
                                          "no better than its blind copy")


def group_of(record: dict, field: str) -> str:
    """The record's value of `field` as a table row name (`(none)` when missing)."""
    value = record.get(field)
    return MISSING_GROUP if value in (None, "") else str(value)


def answer_class(record: dict) -> str:
    """The class of a question: its first reference answer, normalized."""
    return normalize_vqa_answer(record["references"][0])


def _training_turns(sample: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of a LLaVA sample's conversation, in order."""
    turns = [t for t in sample.get("conversations") or [] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    return [(q["value"], a["value"]) for q, a in zip(turns, turns[1:])
            if q.get("from") == "human" and a.get("from") == "gpt"]


def question_key(text: str) -> str:
    """A question as the prior looks it up: the exact words, without `<image>` markers or spacing differences."""
    return " ".join(text.replace("<image>", " ").split())


def majority_answers(records: list[dict], field: str = "question_type", train: list[dict] | None = None) -> dict:
    """{group of `field`: the most frequent normalized answer}: from the `train` samples (LLaVA records, first
    answer) when given, else from the first reference of `records`. Ties go to the answer seen first."""
    counts: dict[str, Counter] = defaultdict(Counter)
    if train is not None:
        for sample in train:
            turns = _training_turns(sample)
            if turns:
                counts[group_of(sample, field)][normalize_vqa_answer(turns[0][1])] += 1
    else:
        for record in records:
            counts[group_of(record, field)][answer_class(record)] += 1
    return {group: counter.most_common(1)[0][0] for group, counter in counts.items()}


def question_prior_answers(train: list[dict]) -> dict[str, str]:
    """{exact question (`question_key`): its most frequent normalized answer in `train`}, over every turn."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for sample in train:
        for question, answer in _training_turns(sample):
            counts[question_key(question)][normalize_vqa_answer(answer)] += 1
    return {question: counter.most_common(1)[0][0] for question, counter in counts.items()}


def _accuracy(records: list[dict]) -> float | None:
    return sum(vqa_accuracy(r["prediction"], r["references"]) for r in records) / len(records) if records else None


def accuracy_by(records: list[dict], key) -> dict[str, dict]:
    """{group: {"accuracy", "n"}} with groups from `key(record)`, sorted by name."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return {name: {"accuracy": _accuracy(rows), "n": len(rows)} for name, rows in sorted(groups.items())}


def match_blind(records: list[dict], blind: list[dict]) -> list[dict]:
    """The blind run's line for each of `records`, matched by `id`; ValueError when one is missing."""
    blind_by_id = {str(r["id"]): r for r in blind}
    missing = [str(r["id"]) for r in records if str(r["id"]) not in blind_by_id]
    if missing:
        raise ValueError(f"the blind predictions lack {len(missing)} of the {len(records)} question ids "
                         f"(e.g. {missing[:3]}); expected a blind run of the same questions")
    return [blind_by_id[str(r["id"])] for r in records]


def verdict(model: float | None, blind: float | None, agreement: float | None) -> str:
    """Did the model beat its blind copy (by BEATS_BLIND_MARGIN), or answer from the words (same answers as the
    blind copy on most items, and no better), or neither? `model`/`blind`: accuracy, or CIDEr for captions."""
    if model is not None and blind is not None and model - blind >= BEATS_BLIND_MARGIN:
        return BEATS_BLIND
    return FROM_THE_WORDS if agreement is not None and agreement > FROM_WORDS_AGREEMENT else NO_BETTER


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def blind_comparison(records: list[dict], blind: list[dict], majority: dict[str, str],
                     field: str = "question_type", prior: dict[str, str] | None = None,
                     group_by=()) -> dict:
    """Model vs blind control vs majority class (vs question prior, with `prior`), per group of `field`, of each
    `group_by` field, per answer class and overall.

    `blind` holds the blind run's lines; they are matched to `records` by `id` (every id must be there).
    A question whose exact words are not in `prior` gets the majority class. Returns
    {"by_<field>": {group: {"model", "blind", "majority"[, "prior"], "n", "agreement", "verdict"}}, "by_<each
    group_by field>", "by_answer", "overall", ["prior_seen": questions whose words were asked in training]};
    `agreement` is the share of questions where trained and blind give the same (normalized) answer; `verdict`
    is None for a group whose questions all have one answer.
    """
    blind_lines = match_blind(records, blind)
    predictions = {"model": [r["prediction"] for r in records], "blind": [b["prediction"] for b in blind_lines],
                   "majority": [majority.get(group_of(r, field), "") for r in records]}
    seen = [prior is not None and question_key(str(r.get("question", ""))) in prior for r in records]
    if prior is not None:
        predictions["prior"] = [prior[question_key(str(r["question"]))] if known else fallback
                                for r, known, fallback in zip(records, seen, predictions["majority"])]
    scores = {run: [vqa_accuracy(p, r["references"]) for p, r in zip(preds, records)]
              for run, preds in predictions.items()}
    same = [normalize_vqa_answer(m) == normalize_vqa_answer(b)
            for m, b in zip(predictions["model"], predictions["blind"])]

    def table(key) -> dict[str, dict]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, record in enumerate(records):
            groups[key(record)].append(i)
        rows = {}
        for name, rows_at in sorted(groups.items()):
            row = {run: _mean(scores[run][i] for i in rows_at) for run in scores}
            row.update(n=len(rows_at), agreement=_mean(same[i] for i in rows_at))
            # In a group of one answer (per answer, or per a label that is the answer) a blind copy that always
            # gives it is right on every item: model vs blind says nothing there, so no verdict.
            one_answer = len({answer_class(records[i]) for i in rows_at}) == 1
            rows[name] = {**row, "verdict": None if one_answer else verdict(row["model"], row["blind"], row["agreement"])}
        return rows

    out = {f"by_{name}": table(lambda r, f=name: group_of(r, f)) for name in dict.fromkeys([field, *group_by])}
    out.update(by_answer=table(answer_class), overall=table(lambda r: "all")["all"])
    if prior is not None:
        out["prior_seen"] = sum(seen)
    return out


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
