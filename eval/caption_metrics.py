"""Caption metrics exactly as the COCO caption toolkit computes them (pycocoevalcap).

`score_caption_runs` does what `pycocoevalcap.eval.COCOEvalCap.evaluate` does -- PTB-tokenize the
references and the predictions, then run Bleu(4), Meteor, Rouge and Cider on the tokenized
dicts -- without needing a COCO annotation object, with any number of references per image, for
several runs (the model, its blind copy) and groups of images at once.
SPICE is left out (it needs a 1 GB Stanford CoreNLP download at first use).

METEOR and the PTB tokenizer are Java programs. Without `java` on PATH, METEOR is skipped and the
captions are tokenized by `simple_tokenize` instead; both are named in the result's `skipped`, so
a report never shows a number computed differently from the toolkit without saying so.
"""
from __future__ import annotations

import logging
import shutil
import string
from collections.abc import Mapping

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

logger = logging.getLogger("eval.caption_metrics")

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
PTB_TOKENIZATION = ("PTBTokenizer (Stanford CoreNLP 3.4.1, lower-cased, punctuation tokens removed), "
                    "as in the COCO caption toolkit")
SIMPLE_TOKENIZATION = ("simple Python tokenization instead of the PTB tokenizer: lower-cased, every ASCII "
                       "punctuation character replaced by a space, split on whitespace; BLEU, ROUGE-L and "
                       "CIDEr can therefore differ slightly from COCO-toolkit numbers")
JAVA_MISSING = "java not found on PATH"

_PUNCTUATION_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def java_available() -> bool:
    """Whether the Java programs (METEOR, PTB tokenizer) can run: `java` is on PATH."""
    return shutil.which("java") is not None


def _one_line(text: str) -> str:
    # The PTB tokenizer runs with -preserveLines and maps output line k to caption k. Java also
    # breaks lines at \r, \u2028, \x85, ... (Python's splitlines set); one of those inside a
    # caption would silently shift every later caption onto the wrong image.
    return " ".join(text.splitlines())


def simple_tokenize(text: str) -> str:
    """The fallback tokenization used when Java is missing (see `SIMPLE_TOKENIZATION`)."""
    return " ".join(_one_line(text).lower().translate(_PUNCTUATION_TO_SPACE).split())


def tokenize_captions(captions: dict[str, list[str]], use_ptb: bool = True) -> dict[str, list[str]]:
    """{id: [caption, ...]} -> {id: [tokenized caption, ...]}, with the PTB tokenizer or `simple_tokenize`."""
    if not use_ptb:
        return {key: [simple_tokenize(c) for c in caps] for key, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize({key: [{"caption": _one_line(c)} for c in caps]
                                         for key, caps in captions.items()})
    wrong = [key for key, caps in captions.items() if len(tokenized.get(key, [])) != len(caps)]
    if wrong:
        raise RuntimeError(f"PTB tokenizer returned the wrong number of captions for ids {wrong[:5]}; "
                           "expected one output line per caption")
    return tokenized


def score_caption_runs(runs: Mapping[str, Mapping[str, str]], references: Mapping[str, list[str]],
                       groups: Mapping | None = None) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of several runs over the same images (e.g. the model and its
    blind copy), one prediction per id against its references, per group of ids.

    `runs`: {run: {id: caption}}, each with the ids of `references` ({id: [caption, ...]}); `groups`:
    {group: [id, ...]} (default {"all": every id}). Every caption is tokenized in one PTB run and METEOR's
    jar starts once; each (group, run) is then scored as COCOEvalCap would score that subset alone:
    corpus-level scores, CIDEr being pycocoevalcap's `Cider` (the CIDEr-D variant the COCO server reports)
    with document frequencies from the group's own references. Returns {"scores": {group: {run: {metric:
    value}}}, "tokenization": str, "skipped": {name: reason}}.
    """
    for run, predictions in runs.items():
        if set(predictions) != set(references):
            missing = sorted(set(predictions) ^ set(references))[:5]
            raise ValueError(f"{run}: predictions and references must have the same ids; these are in only one: "
                             f"{missing}")
    if not references:
        raise ValueError("no captions to score")
    groups = groups if groups is not None else {"all": list(references)}
    skipped: dict[str, str] = {}
    has_java = java_available()
    if not has_java:
        skipped["PTBTokenizer"] = f"{JAVA_MISSING}; used {SIMPLE_TOKENIZATION}"
        skipped["METEOR"] = JAVA_MISSING
    # One tokenizer run for references and every run's predictions: each start of the jar costs seconds.
    everything = {("refs", key): refs for key, refs in references.items()}
    everything.update({(run, key): [caption] for run, predictions in runs.items() for key, caption in predictions.items()})
    keyed = {str(i): everything[key] for i, key in enumerate(everything)}
    tokenized = tokenize_captions(keyed, use_ptb=has_java)
    tokens = {key: tokenized[str(i)] for i, key in enumerate(everything)}

    meteor = Meteor() if has_java else None
    scores: dict = {}
    for group, ids in groups.items():
        gts = {key: tokens[("refs", key)] for key in ids}
        for run in runs:
            res = {key: tokens[(run, key)] for key in ids}
            scores.setdefault(group, {})[run] = _score_tokenized(gts, res, meteor, skipped)
    if "METEOR" in skipped:  # a jar that failed part-way: no METEOR anywhere, rather than for some runs only
        for by_run in scores.values():
            for run_scores in by_run.values():
                run_scores.pop("METEOR", None)
    for name, reason in skipped.items():
        logger.warning("%s skipped: %s", name, reason)
    return {"scores": scores, "tokenization": PTB_TOKENIZATION if has_java else SIMPLE_TOKENIZATION,
            "skipped": skipped}


def _score_tokenized(gts: dict[str, list[str]], res: dict[str, list[str]], meteor, skipped: dict) -> dict:
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n}": float(b) for n, b in zip(range(1, 5), bleu)})
    if meteor is not None and "METEOR" not in skipped:
        try:
            scores["METEOR"] = float(_meteor(meteor, gts, res))
        except (OSError, ValueError) as err:  # the jar died (e.g. no memory for -Xmx2G) or answered garbage
            skipped["METEOR"] = f"the METEOR jar failed: {err!r}"
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in CAPTION_METRICS if name in scores}


def _meteor(scorer, gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    try:
        return scorer.compute_score(gts, res)[0]
    except (OSError, ValueError):
        # compute_score keeps its lock when the jar fails mid-way, and Meteor.__del__ takes that
        # lock to stop the jar: release it, or garbage collection would hang forever.
        if scorer.lock.locked():
            scorer.lock.release()
        raise
