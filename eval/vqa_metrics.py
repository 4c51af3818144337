"""VQA accuracy: the official VQA answer normalization, soft accuracy, closed/open and per-group tables.

The normalization tables and the two processing steps are copied from the official evaluation
script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, `processPunctuation`
and `processDigitArticle`), quirks included, so that answers normalize to the same strings.

One deliberate difference from that script: it fully normalizes only the prediction and trusts
the VQA v2 ground truth to be normalized already (it applies `processPunctuation` to the ground
truth, and only when the ten answers disagree). Domain data sets (VQA-RAD, SLAKE, PathVQA, ...)
have raw references such as "Two." or "The liver", so here prediction and references go through
the same `normalize_vqa_answer`. On already-normalized VQA v2 answers the two agree.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

# --- tables from the official vqaEval.py, verbatim -------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!"]
# The official pattern reads "(?!<=\d)" -- a look-ahead for the text "<=", not a look-behind -- so in
# effect every period not followed by a digit is dropped ("2.5" keeps its point, "dogs." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`, which passes re.UNICODE (32) as the
# *count*: only the first 32 periods are removed. Kept so that answers normalize identically.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)

# --- scoring rule constants ------------------------------------------------------------------

SOFT_ACCURACY_ANSWER_COUNT = 10  # VQA v2 / VizWiz / TextVQA / OK-VQA collect 10 answers per question
CLOSED_ANSWER_TYPES = ("closed", "yes/no")  # VQA-RAD/SLAKE say "CLOSED"; VQA v2 says "yes/no"
YES_NO = ("yes", "no")
MISSING_GROUP = "(none)"  # table row for records without a question_type / source


def _process_punctuation(text: str) -> str:
    """Official `processPunctuation`: glued punctuation becomes a space, spaced punctuation vanishes."""
    out = text
    # Note the official tests the *input* text on every pass, and a digit-comma-digit anywhere in
    # it makes every punctuation mark vanish instead of becoming a space ("1,000" -> "1000").
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _OFFICIAL_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words to digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it.

    Newlines and tabs become spaces, then punctuation, number words (`two` -> `2`), articles,
    case and contractions (`dont` -> `don't`) are normalized:
    `'Two dogs.'` -> `'2 dogs'`, `'An apple, a banana'` -> `'apple banana'`, `'1,000'` -> `'1000'`.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_soft_accuracy(prediction: str, references: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against its human answers (normally 10).

    For each annotator, min(#other annotators who gave the predicted answer / 3, 1); averaged
    over the annotators (the 10-choose-9 subsets). With 10 answers, 4 or more matches give 1.0,
    2 give 0.6, 1 gives 0.3. Both sides are normalized with `normalize_vqa_answer`.
    """
    if not references:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer; found none")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(r) for r in references]
    per_annotator = []
    for left_out in range(len(refs)):
        # By position, not by value: the official compares answer dicts (which carry an
        # answer_id), so leaving one annotator out never removes a different one with the same text.
        matches = sum(1 for i, ref in enumerate(refs) if i != left_out and ref == pred)
        per_annotator.append(min(1.0, matches / 3))
    return sum(per_annotator) / len(per_annotator)


def vqa_exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized reference, else 0.0."""
    pred = normalize_vqa_answer(prediction)
    return 1.0 if any(pred == normalize_vqa_answer(r) for r in references) else 0.0


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Soft VQA accuracy when there are exactly 10 references, exact match after normalization otherwise."""
    if len(references) == SOFT_ACCURACY_ANSWER_COUNT:
        return vqa_soft_accuracy(prediction, references)
    return vqa_exact_match(prediction, references)


def is_closed_question(record: dict) -> bool:
    """Closed-ended (yes/no or a fixed choice) or open-ended.

    The data set's own label wins: `answer_type` "closed" or "yes/no" (any case) is closed, any
    other `answer_type` ("open", "number", "other") is open. Without an `answer_type`, a question
    is closed when every reference normalizes to "yes" or "no".
    """
    answer_type = record.get("answer_type")
    if isinstance(answer_type, str) and answer_type.strip():
        return answer_type.strip().lower() in CLOSED_ANSWER_TYPES
    return all(normalize_vqa_answer(r) in YES_NO for r in record["references"])


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group_table(records: list[dict], scores: list[float], field: str) -> dict[str, dict]:
    """{group: {"accuracy", "n"}} over `field`; empty when no record has the field at all."""
    if not any(r.get(field) not in (None, "") for r in records):
        return {}
    groups: dict[str, list[float]] = defaultdict(list)
    for record, score in zip(records, scores):
        value = record.get(field)
        groups[MISSING_GROUP if value in (None, "") else str(value)].append(score)
    return {name: {"accuracy": _mean(vals), "n": len(vals)} for name, vals in sorted(groups.items())}


def score_vqa(records: Iterable[dict]) -> dict:
    """Accuracy of VQA records (`prediction`, `references`, optional `answer_type`/`question_type`/`source`).

    Returns `vqa_accuracy`, `closed_accuracy`, `open_accuracy` (None where a subset is empty),
    `per_question_type` and `per_source` ({name: {"accuracy", "n"}}, empty when the records carry
    no such field) and `counts`. Accuracies are fractions in [0, 1].
    """
    records = list(records)
    scores = [vqa_accuracy(r["prediction"], r["references"]) for r in records]
    closed = [is_closed_question(r) for r in records]
    soft = sum(1 for r in records if len(r["references"]) == SOFT_ACCURACY_ANSWER_COUNT)
    return {
        "vqa_accuracy": _mean(scores),
        "closed_accuracy": _mean([s for s, c in zip(scores, closed) if c]),
        "open_accuracy": _mean([s for s, c in zip(scores, closed) if not c]),
        "per_question_type": _group_table(records, scores, "question_type"),
        "per_source": _group_table(records, scores, "source"),
        "counts": {"vqa": len(records), "closed": sum(closed), "open": len(records) - sum(closed),
                   "soft_accuracy_10_refs": soft, "exact_match": len(records) - soft},
    }
