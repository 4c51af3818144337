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
from eval.inputs import apply_references, load_references
from eval.report import write_report
from eval.score import score_predictions

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


@pytest.fixture
def no_java(monkeypatch):
    """No java on PATH: simple tokenization, no METEOR (the jar takes 5-30 s to start; not the point here)."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))


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


def test_without_java_meteor_and_ptb_are_skipped_and_named(no_java, monkeypatch, tmp_path):
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


SCENE = {"img_30": "outdoor", "img_100": "outdoor", "img_4": "indoor", "img_12": "indoor", "img_7": "street"}
SURFER = "A man riding a wave on top of a surfboard."  # the blind copy says this of every image


def test_blind_captions_and_groups_equal_the_toolkit_on_each_subset(no_java):
    """Peer: pycocoevalcap's Bleu, Rouge and Cider run on each subset alone, the blind run as its own predictions."""
    labelled = [dict(r, scene=SCENE[r["id"]]) for r in CAPTIONS]
    blind = [dict(r, prediction=SURFER) for r in labelled]
    metrics = score_predictions(labelled, blind=blind, group_by=["scene"])
    captions = metrics["captions"]

    def assert_equal(ours, records):
        expected = toolkit_scores(records, tokenize=simple_tokenize, with_meteor=False)
        assert set(ours) == set(expected)
        for name, value in expected.items():
            assert ours[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name

    assert_equal(captions["overall"]["model"], labelled)
    assert_equal(captions["overall"]["blind"], blind)
    assert captions["overall"]["model"]["CIDEr"] == metrics["CIDEr"]
    for scene in ("outdoor", "indoor", "street"):
        row = captions["per_group"]["scene"][scene]
        assert_equal(row["model"], [r for r in labelled if r["scene"] == scene])
        assert_equal(row["blind"], [r for r in blind if r["scene"] == scene])
        assert row["n"] == sum(1 for r in labelled if r["scene"] == scene)
    # img_30's caption is the blind one: they agree on 1 of 5 images; the model's CIDEr is well above blind's
    assert captions["overall"]["agreement"] == pytest.approx(1 / 5)
    assert captions["overall"]["verdict"] == "beat its blind copy"
    assert captions["copying"] == {"captions": 5, "distinct_predictions": 5, "equal_to_own_reference": 0,
                                   "blind_distinct_predictions": 1}


def test_captions_tokenize_once_and_start_meteor_once(monkeypatch):
    """Peer: the COCO toolkit's own call pattern, counted: one PTB run and one METEOR jar for model, blind and
    every group (each start of a jar costs seconds)."""
    calls = {"ptb": 0, "meteor": 0}

    class CountingMeteor:
        def __init__(self):
            calls["meteor"] += 1

        def compute_score(self, gts, res):
            return 0.5, [0.5] * len(gts)

    def counting_tokenize(self, captions):
        calls["ptb"] += 1
        return {key: [simple_tokenize(c["caption"]) for c in caps] for key, caps in captions.items()}

    monkeypatch.setattr(caption_metrics, "java_available", lambda: True)
    monkeypatch.setattr(caption_metrics.PTBTokenizer, "tokenize", counting_tokenize)
    monkeypatch.setattr(caption_metrics, "Meteor", CountingMeteor)
    labelled = [dict(r, scene=SCENE[r["id"]]) for r in CAPTIONS]
    metrics = score_predictions(labelled, blind=[dict(r, prediction=SURFER) for r in labelled], group_by=["scene"])
    assert calls == {"ptb": 1, "meteor": 1}
    assert metrics["captions"]["per_group"]["scene"]["street"]["blind"]["METEOR"] == 0.5


# A caption set where the model recites training captions: its 4 predictions are training captions word for word
# (case and punctuation aside), one of them right; the blind copy says one sentence of every image.
TRAIN_CAPTIONS = [{"id": f"t{i}", "image": f"t{i}.png", "question_type": "caption", "conversations": [
    {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]}
    for i, caption in enumerate(["A dog runs on the grass.", "Two cats sleep on a sofa.", "A red bus on a street."])]
COPYING = [("c0", "park", "a dog runs on the grass", "A dog runs on the grass."),
           ("c1", "park", "Two cats sleep on a sofa.", "A bird on a branch."),
           ("c2", "home", "two cats sleep on a sofa", "A plate of rice."),
           ("c3", "home", "A red bus on a street", "A small boat on a calm lake.")]
# the eval loss rises after step 50 while the training loss keeps falling
STATE = {"log_history": [{"step": 10, "loss": 3.9}, {"step": 50, "loss": 2.0}, {"step": 50, "eval_loss": 3.48},
                         {"step": 100, "loss": 0.03}, {"step": 100, "eval_loss": 3.81}]}


def test_a_model_that_copies_training_captions_is_reported(no_java, tmp_path, capsys):
    """Peer: counts by hand (4 of 4 copied, 1 of them right; 3 distinct predictions, 1 blind; best eval step 50)."""
    from eval.score import main

    lines = [{"id": i, "image": f"{i}.png", "question_type": "caption", "scene": scene, "prediction": p,
              "references": [r]} for i, scene, p, r in COPYING]
    for name, rows in (("preds.jsonl", lines), ("blind.jsonl", [dict(r, prediction="A dog runs on the grass.")
                                                                for r in lines])):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "train.json").write_text(json.dumps(TRAIN_CAPTIONS))
    (tmp_path / "trainer_state.json").write_text(json.dumps(STATE))
    out = tmp_path / "report"
    assert main([str(tmp_path / "preds.jsonl"), "--blind", str(tmp_path / "blind.jsonl"), "--train-data",
                 str(tmp_path / "train.json"), "--trainer-state", str(tmp_path / "trainer_state.json"),
                 "--group-by", "scene", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("copying: 4 of 4 (100.0%) predicted captions are training captions word for word (1 of them right): "
            "the model recites its training set; 3 distinct captions for 4 images (blind: 1)") in printed
    assert "warning: the eval loss rose from 3.48 at step 50 (its best) to 3.81 at step 100" in printed
    assert "--load_best_model_at_end True" in printed and "or stop at step 50" in printed
    assert "CIDEr: " in printed and "(blind " in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["captions"]["copying"] == {
        "captions": 4, "distinct_predictions": 3, "equal_to_own_reference": 1, "blind_distinct_predictions": 1,
        "training_captions": 3, "equal_to_a_training_caption": 4, "copied_and_right": 1}
    assert metrics["eval_loss_rising"]["best_step"] == 50 and metrics["eval_loss_rising"]["last_train_loss"] == 0.03
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "## Copying and overfitting" in report and "**Warning:** the eval loss" in report
    assert "| equal to a training caption (word for word) | 4 | 100.00 |" in report
    assert "| metric | model | blind |" in report and f"| CIDEr | {metrics['CIDEr']:.4f} |" in report
    park = metrics["captions"]["per_group"]["scene"]["park"]
    assert park["n"] == 2 and park["agreement"] == 0.5  # c0 says what the blind copy says
    assert "### Captions per scene" in report and f"| park | 2 | {park['model']['Bleu_1']:.4f} / " in report
    assert "captions (CIDEr), scene park: " in printed


def test_right_copies_are_not_called_reciting():
    """Peer: a set whose test captions repeat training ones (as synthetic shapes do): copies that are right."""
    from eval.verdict import caption_lines

    copying = {"captions": 4, "distinct_predictions": 2, "equal_to_own_reference": 4, "training_captions": 2,
               "equal_to_a_training_caption": 4, "copied_and_right": 4}
    lines = caption_lines({"captions": {"overall": {"model": {}, "n": 4}, "per_group": {}, "copying": copying}})
    assert lines == ["copying: 4 of 4 (100.0%) predicted captions are training captions word for word (4 of them "
                     "right); 2 distinct captions for 4 images; 4 of 4 (100.0%) equal their own reference"]
