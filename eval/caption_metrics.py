"""Caption metrics exactly as the COCO caption toolkit computes them (pycocoevalcap).

`score_captions` does what `pycocoevalcap.eval.COCOEvalCap.evaluate` does -- PTB-tokenize the
references and the predictions, then run Bleu(4), Meteor, Rouge and Cider on the tokenized
dicts -- without needing a COCO annotation object, and with any number of references per image.
SPICE is left out (it needs a 1 GB Stanford CoreNLP download at first use).

METEOR and the PTB tokenizer are Java programs. Without `java` on PATH, METEOR is skipped and the
captions are tokenized by `simple_tokenize` instead; both are named in the result's `skipped`, so
a report never shows a number computed differently from the toolkit without saying so.
"""
from __future__ import annotations

import logging
import shutil
import string

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


def score_captions(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of one prediction per id against its references.

    `predictions` maps id -> caption, `references` id -> list of captions (same ids). Returns
    {"scores": {"Bleu_1": .., ..., "CIDEr": ..}, "tokenization": str, "skipped": {name: reason}}.
    Scores are corpus-level, as COCOEvalCap reports them; CIDEr is pycocoevalcap's `Cider`
    (the CIDEr-D variant the COCO server reports), with document frequencies from these references.
    """
    if set(predictions) != set(references):
        missing = sorted(set(predictions) ^ set(references))[:5]
        raise ValueError(f"predictions and references must have the same ids; these are in only one: {missing}")
    if not predictions:
        raise ValueError("no captions to score")
    skipped: dict[str, str] = {}
    has_java = java_available()
    if not has_java:
        skipped["PTBTokenizer"] = f"{JAVA_MISSING}; used {SIMPLE_TOKENIZATION}"
    gts = tokenize_captions(references, use_ptb=has_java)
    res = tokenize_captions({key: [caption] for key, caption in predictions.items()}, use_ptb=has_java)

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n}": float(b) for n, b in zip(range(1, 5), bleu)})
    if not has_java:
        skipped["METEOR"] = JAVA_MISSING
    else:
        try:
            scores["METEOR"] = float(_meteor(gts, res))
        except (OSError, ValueError) as err:  # the jar died (e.g. no memory for -Xmx2G) or answered garbage
            skipped["METEOR"] = f"the METEOR jar failed: {err!r}"
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    for name, reason in skipped.items():
        logger.warning("%s skipped: %s", name, reason)
    return {"scores": scores, "tokenization": PTB_TOKENIZATION if has_java else SIMPLE_TOKENIZATION,
            "skipped": skipped}


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    scorer = Meteor()
    try:
        return scorer.compute_score(gts, res)[0]
    except (OSError, ValueError):
        # compute_score keeps its lock when the jar fails mid-way, and Meteor.__del__ takes that
        # lock to stop the jar: release it, or garbage collection would hang forever.
        if scorer.lock.locked():
            scorer.lock.release()
        raise
