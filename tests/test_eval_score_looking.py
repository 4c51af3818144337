"""eval.score --blind/--train-data/--group-by: is the model looking? Hand-made predictions, figures by hand."""
import json

import pytest

from eval.plots import confusion_figure
from eval.score import main, score_predictions
from eval.verdict import verdict_lines


def _line(i, answer, prediction, label):
    return {"id": f"q{i}", "question_type": "garment", "answer_type": "closed", "references": [answer],
            "prediction": prediction, "label": label}


# 6 questions: 3 "coat", 2 "dress", 1 "sandal". The model gets 5 right (one coat answered "dress").
PREDS = [_line(0, "coat", "Coat.", "outer"), _line(1, "coat", "coat", "outer"), _line(2, "coat", "dress", "outer"),
         _line(3, "dress", "dress", "inner"), _line(4, "dress", "dress", "inner"), _line(5, "sandal", "sandal", "shoe")]
BLIND = [dict(p, prediction="coat") for p in PREDS]  # the blind model always says "coat"
TRAIN = [{"id": f"t{i}", "question_type": "garment", "conversations": [
    {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer}]}
    for i, answer in enumerate(["dress", "dress", "coat"])]


def test_blind_majority_per_answer_and_confusion():
    metrics = score_predictions(PREDS, blind=BLIND, train=TRAIN, group_by=["label"])
    looking = metrics["looking"]
    assert looking["majority_answers"] == {"garment": "dress"} and looking["majority_from"] == "training data"
    # The lines carry no question text: the question prior falls back to the majority class.
    assert looking["overall"] == {"model": pytest.approx(5 / 6), "blind": pytest.approx(3 / 6),
                                  "majority": pytest.approx(2 / 6), "prior": pytest.approx(2 / 6), "n": 6,
                                  "agreement": pytest.approx(2 / 6), "verdict": "beat its blind copy"}
    assert looking["prior_seen"] == 0
    # One answer per row: a blind "coat" is right on every coat, so model vs blind gets no verdict there.
    assert looking["by_answer"]["coat"] == {"model": pytest.approx(2 / 3), "blind": 1.0, "majority": 0.0, "prior": 0.0,
                                            "n": 3, "agreement": pytest.approx(2 / 3), "verdict": None}
    assert looking["by_answer"]["dress"] == {"model": 1.0, "blind": 0.0, "majority": 1.0, "prior": 1.0, "n": 2,
                                             "agreement": 0.0, "verdict": None}
    assert set(looking["by_label"]) == {"inner", "outer", "shoe"}
    assert {row["verdict"] for row in looking["by_label"].values()} == {None}  # each label is one answer here
    assert metrics["per_answer"] == {"coat": {"accuracy": pytest.approx(2 / 3), "n": 3},
                                     "dress": {"accuracy": 1.0, "n": 2}, "sandal": {"accuracy": 1.0, "n": 1}}
    matrix = metrics["confusion_matrix"]
    assert matrix["columns"] == ["coat", "dress", "sandal", "(other)"]
    assert matrix["counts"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0]]
    assert metrics["per_group"]["label"] == {"inner": {"accuracy": 1.0, "n": 2},
                                             "outer": {"accuracy": pytest.approx(2 / 3), "n": 3},
                                             "shoe": {"accuracy": 1.0, "n": 1}}
    # Without training data the majority answer comes from the references: "coat".
    from_refs = score_predictions(PREDS, blind=BLIND)["looking"]
    assert from_refs["majority_answers"] == {"garment": "coat"} and from_refs["overall"]["majority"] == 0.5


def test_blind_run_must_hold_every_question():
    with pytest.raises(ValueError, match="blind predictions lack 1 of the 6"):
        score_predictions(PREDS, blind=BLIND[:-1])


def test_cli_writes_the_tables_heatmap_and_says_why_a_plot_is_missing(tmp_path, capsys):
    for name, lines in (("preds.jsonl", PREDS), ("blind.jsonl", BLIND)):
        (tmp_path / name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "train.json").write_text(json.dumps(TRAIN))
    out = tmp_path / "report"
    assert main([str(tmp_path / "preds.jsonl"), "--blind", str(tmp_path / "blind.jsonl"), "--train-data",
                 str(tmp_path / "train.json"), "--group-by", "label", "--out", str(out)]) == 0
    assert "model 83.33%, blind control 50.00%, majority class 33.33%" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| all | 83.33 | 50.00 | 33.33 | 33.33 | 6 | 33.33 | beat its blind copy |" in report
    assert "| coat | 66.67 | 100.00 | 0.00 | 0.00 | 3 | 66.67 | – (one answer) |" in report
    assert "| coat | 2 | 1 | 0 | 0 |" in report  # confusion matrix row
    # per label: the model beside its baselines (the looking table), not a second accuracy-only table
    assert "| label | model (%) |" in report and "| outer | 66.67 | 100.00 | 0.00 | 0.00 | 3 |" in report
    assert "### Accuracy per label" not in report
    assert "No accuracy_by_question_type.png" in report and "No accuracy_by_source.png" in report
    for plot in ("confusion_matrix.png", "model_blind_majority.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and f"]({plot})" in report
    assert json.loads((out / "metrics.json").read_text())["looking"]["overall"]["n"] == 6


def _question(i, qtype, question, answer, prediction, blind_prediction):
    line = {"id": f"{qtype}{i}", "question_type": qtype, "question": question, "references": [answer],
            "prediction": prediction, "label": "shape" if qtype == "shape" else "other"}
    return line, dict(line, prediction=blind_prediction)


def _sample(i, qtype, question, answer):
    return {"id": f"s{i}", "question_type": qtype, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


# yes/no: the model answers exactly as its blind copy (the words decide); colour: it reads the picture;
# shape: different answers from blind, no better. The training split's answers per exact question make the
# question prior: "circle?" -> yes, "square?" -> no, "What colour is it?" -> red; "Which colour?" is new.
PAIRS = [_question(0, "yesno", "Is there a circle?", "yes", "yes", "yes"),
         _question(1, "yesno", "Is there a circle?", "yes", "Yes.", "yes"),
         _question(2, "yesno", "Is there a square?", "no", "no", "no"),
         _question(3, "yesno", "Is there a square?", "no", "no", "no"),
         _question(4, "colour", "What colour is it?", "red", "red", "red"),
         _question(5, "colour", "What colour is it?", "blue", "blue", "red"),
         _question(6, "colour", "Which colour?", "green", "green", "red"),
         _question(7, "shape", "What shape?", "circle", "square", "circle"),
         _question(8, "shape", "What shape?", "square", "circle", "circle")]
PRIOR_TRAIN = [_sample(i, qtype, q, a) for i, (qtype, q, a) in enumerate(
    [("yesno", "Is there a circle?", "yes")] * 3 + [("yesno", "Is there a circle?", "no")]
    + [("yesno", "Is there a square?", "no")] * 3 + [("yesno", "Is there a square?", "yes")]
    + [("colour", "What colour is it?", "red")] * 2 + [("colour", "What colour is it?", "blue")]
    + [("shape", "What shape?", "circle")])]


def test_verdict_per_type_and_the_question_prior():
    """Peer: figures by hand. yes/no: majority "yes" (tie, first seen) scores 2/4, the prior per exact question 4/4;
    the model equals its blind copy on every item. Colour: the model 3/3, blind 1/3. Shape: 0/2 vs 1/2 (prior 1/2)."""
    preds, blind = [p for p, _ in PAIRS], [b for _, b in PAIRS]
    metrics = score_predictions(preds, blind=blind, train=PRIOR_TRAIN, group_by=["label"])
    looking = metrics["looking"]
    yesno, colour, shape = (looking["by_question_type"][t] for t in ("yesno", "colour", "shape"))
    assert (yesno["model"], yesno["blind"], yesno["majority"], yesno["prior"]) == (1.0, 1.0, 0.5, 1.0)
    assert yesno["agreement"] == 1.0 and yesno["verdict"] == "answered from the words"
    assert colour["prior"] == pytest.approx(1 / 3)  # "Which colour?" was never asked: the majority class, "red"
    assert colour["agreement"] == pytest.approx(1 / 3) and colour["verdict"] == "beat its blind copy"
    assert shape["agreement"] == 0.5 and shape["verdict"] == "no better than its blind copy"
    assert looking["prior_seen"] == 8
    assert looking["overall"]["prior"] == pytest.approx(6 / 9) and looking["overall"]["majority"] == pytest.approx(4 / 9)
    assert looking["by_label"]["shape"]["verdict"] == "no better than its blind copy"

    lines = verdict_lines(metrics)
    assert lines[0] == ("model 77.78%, blind control 66.67%, majority class 44.44%, question prior 66.67% "
                        "(majority from training data)")
    assert "question type yesno: answered from the words (100.00% vs blind 100.00%; the same answer as blind on " \
           "4 of 4)" in lines
    assert "question type colour: beat its blind copy (100.00% vs blind 33.33%; the same answer as blind on 1 of 3)" \
           in lines
    assert any(line.startswith("label shape: no better than its blind copy") for line in lines)
    assert looking["by_answer"]["yes"]["verdict"] is None and not any(line.startswith("answer") for line in lines)


def test_confusion_matrix_colours_the_share_of_each_row():
    """Peer: the counts divided by their row's total by hand; a 7,090-question class and a 10-question one read alike."""
    matrix = {"labels": ["no", "yes"], "columns": ["no", "yes", "(other)"], "counts": [[7000, 90, 0], [1, 9, 0]]}
    figure = confusion_figure(matrix)
    shares = figure.axes[0].images[0].get_array()
    assert shares.ravel().tolist() == pytest.approx([7000 / 7090, 90 / 7090, 0.0, 0.1, 0.9, 0.0])
    assert {text.get_text() for text in figure.axes[0].texts} == {"7000", "90", "1", "9"}  # the counts, in the cells
