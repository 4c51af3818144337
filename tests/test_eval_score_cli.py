"""`python -m eval.score` end to end: metrics.json keys, report.md, plots; loss curve from a
trainer_state.json found beside the model; the plotting functions on their own."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from eval.overfitting import eval_loss_rising, find_trainer_state, loss_history, read_loss_history
from eval.plots import plot_accuracy_bars, plot_loss_curve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PREDICTIONS = [
    {"id": "cap_2", "image": "b.jpg", "question": "Describe the image.", "question_type": "caption",
     "prediction": "Two cats sleeping on a couch.",
     "references": ["Two cats asleep on a couch.", "A pair of cats sleep on the sofa."]},
    {"id": "cap_1", "image": "a.jpg", "question": "Describe the image.", "question_type": "caption",
     "prediction": "A dog runs on the grass.",
     "references": ["A dog running on grass.", "A brown dog runs across a lawn.", "The dog plays outside."]},
    {"id": "q1", "image": "a.jpg", "question": "Is there a dog?", "prediction": "Yes.", "references": ["yes"],
     "answer_type": "CLOSED", "question_type": "presence", "source": "rad"},
    {"id": "q2", "image": "a.jpg", "question": "How many dogs?", "prediction": "two", "references": ["1"],
     "answer_type": "OPEN", "question_type": "count", "source": "slake"},
    {"id": "q3", "image": "b.jpg", "question": "How many cats?", "prediction": "2",
     "references": ["2", "2", "2", "two", "3", "3", "3", "3", "2", "3"], "question_type": "count", "source": "slake"},
]

LOG_HISTORY = [{"epoch": 0.1 * s, "step": s, "loss": 3.0 - 0.2 * s, "learning_rate": 1e-4} for s in range(1, 11)]
LOG_HISTORY += [{"epoch": 0.5, "step": 5, "eval_loss": 2.2}, {"epoch": 1.0, "step": 10, "eval_loss": 1.5},
                {"epoch": 1.0, "step": 10, "train_loss": 2.0, "train_runtime": 3.0}]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.write("\n")  # a trailing blank line is ignored
    return str(path)


def write_trainer_state(folder, log_history):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "trainer_state.json")
    with open(path, "w") as f:
        json.dump({"global_step": 10, "log_history": log_history}, f)
    return path


def run_score(*args, env=None):
    return subprocess.run([sys.executable, "-m", "eval.score", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    assert os.path.getsize(path) > 2000, path


def test_find_trainer_state_prefers_the_folder_then_the_highest_checkpoint(tmp_path):
    assert find_trainer_state(str(tmp_path)) is None
    write_trainer_state(tmp_path / "checkpoint-9", LOG_HISTORY[:3])
    newest = write_trainer_state(tmp_path / "checkpoint-10", LOG_HISTORY)  # "10" < "9" as text
    os.makedirs(tmp_path / "checkpoint-11")  # incomplete: no trainer_state.json
    assert find_trainer_state(str(tmp_path)) == newest
    top = write_trainer_state(tmp_path, LOG_HISTORY)
    assert find_trainer_state(str(tmp_path)) == top


def test_loss_history_and_curve(tmp_path):
    state = write_trainer_state(tmp_path, LOG_HISTORY)
    train, evals = read_loss_history(state)
    assert [s for s, _ in train] == list(range(1, 11))  # the final train_loss summary is not a point
    assert evals == [(5, 2.2), (10, 1.5)]
    assert_png(plot_loss_curve(state, str(tmp_path / "loss.png")))

    empty = write_trainer_state(tmp_path / "no_losses", [{"step": 1, "learning_rate": 1e-4}])
    with pytest.raises(ValueError, match="no 'loss' or 'eval_loss'"):
        plot_loss_curve(empty, str(tmp_path / "none.png"))


def test_eval_loss_rising_needs_a_rise_past_the_best_while_training_loss_falls():
    """Peer: the log histories read by hand (best eval step, the training loss before and after it)."""
    train, evals = loss_history({"global_step": 10, "log_history": LOG_HISTORY})
    assert eval_loss_rising(train, evals) is None  # eval 2.2 -> 1.5: still improving
    rising = eval_loss_rising([(5, 2.0), (10, 0.5)], [(5, 3.48), (10, 3.81)])  # two eval points are enough
    assert (rising["best_step"], rising["last_eval_loss"], rising["train_loss_at_best"]) == (5, 3.81, 2.0)
    assert "from 3.48 at step 5 (its best) to 3.81 at step 10" in rising["warning"]
    assert eval_loss_rising([(5, 0.5), (10, 0.6)], [(5, 3.48), (10, 3.81)]) is None  # training loss did not fall
    assert eval_loss_rising([(5, 2.0), (10, 0.5)], [(5, 3.48), (10, 3.5)]) is None  # within 2% of the best: noise


def test_accuracy_bars_with_several_series(tmp_path):
    tables = {"model": {"count": {"accuracy": 0.5, "n": 4}, "organ": {"accuracy": 0.75, "n": 4}},
              "blind": {"count": 0.25, "organ": 0.5, "modality": 0.4},  # a category only this series has
              "majority class": {"count": 0.25, "organ": 0.25}}
    assert_png(plot_accuracy_bars(tables, str(tmp_path / "bars.png")))
    with pytest.raises(ValueError, match="at least one series"):
        plot_accuracy_bars({}, str(tmp_path / "empty.png"))


@pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics need java")
@pytest.mark.slow  # starts the METEOR jar (5-15 s)
def test_cli_end_to_end(tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", PREDICTIONS)
    model_dir = tmp_path / "runs" / "lora"
    write_trainer_state(model_dir / "checkpoint-5", LOG_HISTORY[:5])
    newest = write_trainer_state(model_dir / "checkpoint-10", LOG_HISTORY)
    out = tmp_path / "report"

    result = run_score(preds, "--out", str(out), "--model-path", str(model_dir))
    assert result.returncode == 0, result.stderr

    for name in ("metrics.json", "report.md"):
        assert (out / name).is_file(), name
    for name in ("accuracy_by_question_type.png", "accuracy_by_source.png", "loss_curve.png"):
        assert_png(out / name)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "vqa_accuracy",
                "closed_accuracy", "open_accuracy", "per_question_type", "per_source", "counts", "skipped"):
        assert key in metrics, key
    assert metrics["skipped"] == {}
    assert metrics["counts"] == {"records": 5, "caption": 2, "vqa": 3, "closed": 1, "open": 2,
                                 "soft_accuracy_10_refs": 1, "exact_match": 2}
    # q1 right; q2 wrong; q3: five "2"/"two" among 10 answers -> 1.0
    assert metrics["vqa_accuracy"] == pytest.approx(2 / 3)
    assert metrics["per_question_type"]["count"] == {"accuracy": 0.5, "n": 2}
    assert metrics["per_source"]["rad"] == {"accuracy": 1.0, "n": 1}
    assert metrics["inputs"]["trainer_state"] == os.path.abspath(newest)

    report = (out / "report.md").read_text()
    for text in ("| Bleu_4 |", "| CIDEr |", "| METEOR |", "| closed | 100.00 | 1 |", "| count | 50.00 | 2 |",
                 "![accuracy per question type](accuracy_by_question_type.png)", "![loss curve](loss_curve.png)"):
        assert text in report, text
    assert "Bleu_1:" in result.stdout and "vqa_accuracy: 66.67%" in result.stdout


def test_cli_without_java_on_path_and_default_outputs(tmp_path):
    # PATH holds no java at all: the real check (shutil.which over PATH), not a monkeypatch.
    preds = write_jsonl(tmp_path / "preds.jsonl", PREDICTIONS)
    write_trainer_state(tmp_path, LOG_HISTORY)  # beside the predictions: found without --model-path
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin)}

    result = run_score(preds, env=env)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "preds_report"  # default: <predictions name>_report beside the predictions
    metrics = json.loads((out / "metrics.json").read_text())
    assert "METEOR" not in metrics and set(metrics["skipped"]) == {"METEOR", "PTBTokenizer"}
    assert "Bleu_4" in metrics and "CIDEr" in metrics and "vqa_accuracy" in metrics
    assert "skipped METEOR: java not found" in result.stdout
    assert "**METEOR**: java not found" in (out / "report.md").read_text()
    assert_png(out / "loss_curve.png")


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PREDICTIONS[2]) + "\n{not json\n")
    result = run_score(str(bad), "--out", str(tmp_path / "r"))
    assert result.returncode != 0
    assert "bad.jsonl:2: not a JSON line" in result.stderr and "Traceback" not in result.stderr

    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({**PREDICTIONS[2], "references": []}) + "\n")
    result = run_score(str(missing), "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "no references" in result.stderr
