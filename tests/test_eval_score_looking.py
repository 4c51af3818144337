"""eval.score --blind/--train-data/--group-by: is the model looking? Hand-made predictions, figures by hand."""
import json

import pytest

from eval.score import main, score_predictions


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
    assert looking["overall"] == {"model": pytest.approx(5 / 6), "blind": pytest.approx(3 / 6),
                                  "majority": pytest.approx(2 / 6), "n": 6}
    assert looking["by_answer"]["coat"] == {"model": pytest.approx(2 / 3), "blind": 1.0, "majority": 0.0, "n": 3}
    assert looking["by_answer"]["dress"] == {"model": 1.0, "blind": 0.0, "majority": 1.0, "n": 2}
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
    assert "| all | 83.33 | 50.00 | 33.33 | 6 |" in report
    assert "| coat | 66.67 | 100.00 | 0.00 | 3 |" in report
    assert "| coat | 2 | 1 | 0 | 0 |" in report  # confusion matrix row
    assert "### Accuracy per label" in report and "| outer | 66.67 | 3 |" in report
    assert "No accuracy_by_question_type.png" in report and "No accuracy_by_source.png" in report
    for plot in ("confusion_matrix.png", "model_blind_majority.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and f"]({plot})" in report
    assert json.loads((out / "metrics.json").read_text())["looking"]["overall"]["n"] == 6
