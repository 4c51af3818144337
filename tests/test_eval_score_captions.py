"""Caption scoring equals the COCO caption toolkit (pycocoevalcap) run the COCOEvalCap way, with several
references per image and ids out of order; the Java-missing path names what it skipped."""
import json
import shutil
import threading

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from eval import caption_metrics
from eval.caption_metrics import SIMPLE_TOKENIZATION, simple_tokenize, tokenize_captions
from eval.report import write_report
from eval.score import apply_references, load_references, score_predictions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need java")

# Ids deliberately out of order (and not sorted the same as strings or as numbers); 2 to 5 references
# per image; punctuation and case that the PTB tokenizer must handle.
CAPTIONS = [
    {"id": "img_30", "image": "val/000030.jpg", "prediction": "A man riding a wave on top of a surfboard.",
     "references": ["A surfer rides a large wave in the ocean.", "A man on a surfboard riding a wave.",
                    "Surfer in a wetsuit riding a big wave!", "A person surfing on a wave.",
                    "A man is surfing on the ocean's waves."]},
    {"id": "img_4", "image": "val/000004.jpg", "prediction": "Two cats are sleeping on a couch",
     "references": ["Two cats asleep on a red couch.", "A pair of cats sleep on the sofa."]},
    {"id": "img_12", "image": "val/000012.jpg", "prediction": "a plate of food with broccoli and rice",
     "references": ["A plate with rice, broccoli and chicken.", "Food on a white plate: rice and broccoli.",
                    "A healthy meal of chicken, rice, and vegetables."]},
    {"id": "img_7", "image": "val/000007.jpg", "prediction": "A red double decker bus driving down a street.",
     "references": ["A red double-decker bus on a city street.", "A bus drives down the road in London.",
                    "Red bus driving past buildings.", "A double decker bus on the street."]},
    {"id": "img_100", "image": "val/000100.jpg", "prediction": "A dog catching a frisbee in a park.",
     "references": ["A dog jumps to catch a frisbee.", "A brown dog catching a flying disc on the grass.",
                    "Dog playing frisbee in the park."]},
]
for _record in CAPTIONS:
    _record.update(question="Describe the image.", question_type="caption")

METHODS = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]


def toolkit_scores(records, tokenize=None, with_meteor=True):
    """What COCOEvalCap.evaluate computes, written out independently of eval.caption_metrics.

    Dicts are built in sorted-id order (the records are not sorted), so a mix-up of ids or of
    references between images in the code under test shows as different numbers.
    """
    ordered = sorted(records, key=lambda r: r["id"])
    gts = {r["id"]: [{"caption": c} for c in r["references"]] for r in ordered}
    res = {r["id"]: [{"caption": r["prediction"]}] for r in ordered}
    if tokenize is None:
        gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
    else:
        gts = {k: [tokenize(c["caption"]) for c in v] for k, v in gts.items()}
        res = {k: [tokenize(c["caption"]) for c in v] for k, v in res.items()}
    methods = METHODS + ([(Meteor(), "METEOR")] if with_meteor else [])
    out = {}
    for scorer, method in methods:
        score, _ = scorer.compute_score(gts, res)
        if isinstance(method, list):
            out.update(zip(method, score))
        else:
            out[method] = score
    return out


@pytest.fixture(scope="module")
def ours_and_toolkit():
    return score_predictions(CAPTIONS), toolkit_scores(CAPTIONS)


@needs_java
@pytest.mark.slow  # two METEOR jar starts, 5-15 s each
def test_caption_metrics_equal_the_coco_toolkit(ours_and_toolkit):
    ours, toolkit = ours_and_toolkit
    assert set(toolkit) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name, value in toolkit.items():
        assert ours[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert ours["skipped"] == {} and ours["caption_tokenization"].startswith("PTBTokenizer")
    assert ours["counts"] == {"records": 5, "caption": 5, "vqa": 0}
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] < 1 and ours["CIDEr"] > 0.5  # a fixture that discriminates


@needs_java
@pytest.mark.slow
def test_the_comparison_notices_swapped_references(ours_and_toolkit):
    # The equality above would fail if references reached the wrong image: swapping two images'
    # references changes every metric.
    ours, _ = ours_and_toolkit
    swapped = [dict(r) for r in CAPTIONS]
    swapped[0]["references"], swapped[1]["references"] = CAPTIONS[1]["references"], CAPTIONS[0]["references"]
    wrong = toolkit_scores(swapped, with_meteor=False)
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert wrong[name] != pytest.approx(ours[name], rel=1e-3), name


@needs_java
def test_line_breaks_inside_a_caption_do_not_shift_later_captions():
    # The PTB tokenizer maps output line k to caption k; a \r or \u2028 inside a caption would
    # otherwise hand every later caption to the wrong image.
    tokenized = tokenize_captions({"a": ["A dog\rrunning."], "b": ["Two\u2028cats"], "c": ["", "A bird."]})
    assert tokenized == {"a": ["a dog running"], "b": ["two cats"], "c": ["", "a bird"]}


def test_without_java_meteor_and_ptb_are_skipped_and_named(monkeypatch, tmp_path):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))

    def no_ptb(*args, **kwargs):
        raise AssertionError("the PTB tokenizer must not run without java")

    monkeypatch.setattr(caption_metrics.PTBTokenizer, "tokenize", no_ptb)
    metrics = score_predictions(CAPTIONS)

    assert "METEOR" not in metrics
    assert set(metrics["skipped"]) == {"METEOR", "PTBTokenizer"}
    assert "java" in metrics["skipped"]["METEOR"]
    assert SIMPLE_TOKENIZATION in metrics["skipped"]["PTBTokenizer"]
    assert metrics["caption_tokenization"] == SIMPLE_TOKENIZATION
    # The other metrics are still pycocoevalcap's scorers, on the simply tokenized text.
    expected = toolkit_scores(CAPTIONS, tokenize=simple_tokenize, with_meteor=False)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name

    written = write_report(metrics, str(tmp_path / "report"))
    assert json.load(open(written["metrics.json"]))["skipped"]["METEOR"] == metrics["skipped"]["METEOR"]
    report = open(written["report.md"]).read()
    assert "## Skipped" in report and "**METEOR**: java not found" in report
    assert "**PTBTokenizer**" in report and "simple Python tokenization" in report
    assert "| METEOR |" not in report


def test_simple_tokenization():
    assert simple_tokenize("A man's DOG,\nrunning-fast.") == "a man s dog running fast"


def test_coco_captions_reference_file_matches_on_image_name(tmp_path):
    coco = {"images": [{"id": 30, "file_name": "000030.jpg"}, {"id": 4, "file_name": "000004.jpg"}],
            "annotations": [{"image_id": 30, "id": 1, "caption": "A surfer on a wave."},
                            {"image_id": 4, "id": 2, "caption": "Two cats."},
                            {"image_id": 30, "id": 3, "caption": "Someone surfing."}]}
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(coco))
    refs = load_references(str(path))
    assert refs["30"] == refs["000030.jpg"] == ["A surfer on a wave.", "Someone surfing."]
    records = apply_references(CAPTIONS, refs)
    assert records[0]["references"] == ["A surfer on a wave.", "Someone surfing."]
    assert records[1]["references"] == ["Two cats."]
    assert records[2]["references"] == CAPTIONS[2]["references"]  # not in the file: keeps its own


@needs_java
def test_a_failing_meteor_jar_is_named_and_releases_its_lock(monkeypatch):
    class FailingMeteor:
        """Mimics pycocoevalcap's Meteor when the jar dies mid-run: the lock is taken, float('') fails."""
        instances = []

        def __init__(self):
            self.lock = threading.Lock()
            FailingMeteor.instances.append(self)

        def compute_score(self, gts, res):
            self.lock.acquire()
            return float(""), []

    monkeypatch.setattr(caption_metrics, "Meteor", FailingMeteor)
    metrics = score_predictions(CAPTIONS[:2])
    assert "METEOR" not in metrics and "Bleu_4" in metrics
    assert metrics["skipped"]["METEOR"].startswith("the METEOR jar failed: ValueError")
    # Meteor.__del__ takes this lock to stop the jar; left held, garbage collection would hang.
    assert not FailingMeteor.instances[0].lock.locked()
