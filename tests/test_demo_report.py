"""eval.demo_report (the demo's verdict): per-type accuracy of the model, the blind control and the majority class; the goal."""
import json
import math
import os
import subprocess
import sys

import pytest

from eval.demo_report import build_metrics, first_loss_check, goal_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pred(i, qtype, answer, prediction):
    return {"id": f"{i}-{qtype}", "question_type": qtype, "references": [answer], "prediction": prediction}


def _train(answers):
    return [{"id": str(i), "question_type": t, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                   {"from": "gpt", "value": a}]}
            for i, (t, a) in enumerate(answers)]


def test_accuracy_blind_and_majority_per_type():
    train = _train([("color", "red"), ("color", "red"), ("color", "blue"), ("count", "2"), ("count", "3"),
                    ("count", "3"), ("caption", "a red square.")])
    preds = [_pred(0, "color", "red", "Red."), _pred(1, "color", "blue", "blue"), _pred(2, "color", "blue", "red"),
             _pred(3, "count", "3", "3"), _pred(4, "count", "2", "two"), _pred(5, "caption", "x", "y")]
    blind = [dict(p, prediction="red") for p in preds]
    metrics = build_metrics(preds, blind, train)
    assert metrics["accuracy"]["color"] == pytest.approx(2 / 3)  # "Red." normalises to "red"
    assert metrics["accuracy"]["count"] == 1.0  # "two" normalises to "2"
    assert metrics["accuracy"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["majority_accuracy"]["color"] == pytest.approx(1 / 3)  # always "red"
    assert metrics["majority_accuracy"]["count"] == pytest.approx(1 / 2)  # always "3"
    assert metrics["blind_accuracy"]["color"] == pytest.approx(1 / 3)
    assert "caption" not in metrics["accuracy"]
    assert metrics["num_questions"]["color"] == 3


def test_goal_needs_mean_every_type_and_an_uninformed_blind_model():
    good = {"color": 1.0, "shape": 0.9, "count": 0.95, "presence": 0.7, "mean": 0.8875}
    chance = {"color": 0.25, "shape": 0.33, "count": 0.33, "presence": 0.5}
    assert goal_check(good, chance, chance)["met"]
    weak = dict(good, presence=0.55)
    result = goal_check(weak, chance, chance)
    assert not result["met"] and not result["checks"]["presence accuracy >= 0.6"]
    leaky = dict(chance, shape=0.45)  # the blind model beats the majority class: answers leak through text
    result = goal_check(good, leaky, chance)
    assert not result["met"] and not result["checks"]["shape blind within 0.05 of majority"]
    assert not goal_check(dict(good, mean=0.79), chance, chance)["met"]


def test_first_loss_is_compared_with_ln_vocabulary():
    state = {"log_history": [{"step": 1, "loss": 6.9}, {"step": 25, "loss": 2.0}, {"eval_loss": 1.0, "step": 25}]}
    assert first_loss_check(state, 1000) == {"first_step": 1, "first_loss": 6.9, "last_loss": 2.0,
                                             "ln_vocab": math.log(1000)}
    assert first_loss_check({"log_history": []}, 1000) is None


def test_cli_writes_metrics_report_plots_and_two_lines(tmp_path):
    train = _train([("color", "red"), ("color", "blue"), ("color", "red")])
    (tmp_path / "train.json").write_text(json.dumps(train))
    preds = [_pred(i, "color", a, a) for i, a in enumerate(["red", "blue", "green", "red"])]
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (tmp_path / "blind.jsonl").write_text("".join(json.dumps(dict(p, prediction="red")) + "\n" for p in preds))
    (tmp_path / "leak.json").write_text(json.dumps({"shared_images": 0}))
    (tmp_path / "state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 1.0}]}))
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 400}}))
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "eval.demo_report",
                           "--preds", str(tmp_path / "preds.jsonl"), "--blind-preds", str(tmp_path / "blind.jsonl"),
                           "--train", str(tmp_path / "train.json"), "--leakage", str(tmp_path / "leak.json"),
                           "--trainer-state", str(tmp_path / "state.json"), "--model-config",
                           str(tmp_path / "config.json"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("trained model: mean accuracy 1.00")
    assert "goal missed" in lines[1]  # only colour was asked: shape, count and presence are missing
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "blind_accuracy", "majority_accuracy", "goal", "training_loss"}
    assert metrics["shared_images_across_splits"] == 0
    assert metrics["training_loss"]["ln_vocab"] == pytest.approx(math.log(400))
    assert (out / "accuracy_by_type.png").stat().st_size > 0 and (out / "loss_curve.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| color | 1.000 | 0.500 | 0.500 | 4 |" in report and "ln vocabulary = 5.99" in report
