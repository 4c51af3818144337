"""The demo's verdict: does the trained model look at the image?

    python -m eval.demo_report --preds P.jsonl --blind-preds B.jsonl --train data_train.json \
        --trainer-state model/trainer_state.json --leakage sets/leakage_report.json --out runs/demo

Per question type: accuracy of the trained model, of the same model with every image blanked
(the "blind" control), and of always answering the training split's most frequent answer
(the majority class), all computed by `eval.score` (`--blind`, `--train-data`); this script adds
the demo's goal for its four question types, the first-loss check and the two summary lines.
A model that looks at the image beats both baselines; a blind model that beats the majority class
would mean the answers leak through the text.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .inputs import load_predictions
from .overfitting import loss_history
from .plots import plot_accuracy_bars, plot_loss_curve
from .score import score_predictions

QUESTION_TYPES = ("color", "shape", "count", "presence")
# The demo's goal: the model reads the picture, and the text alone tells nothing.
GOAL_MEAN, GOAL_EACH, GOAL_BLIND_MARGIN = 0.80, 0.60, 0.05


def with_mean(table: dict[str, float]) -> dict[str, float]:
    present = [table[t] for t in QUESTION_TYPES if t in table]
    return {**table, "mean": sum(present) / len(present) if present else 0.0}


def goal_check(accuracy: dict[str, float], blind: dict[str, float], majority: dict[str, float]) -> dict:
    """Mean accuracy >= 0.80, every type >= 0.60, blind within 0.05 of the majority class on every type."""
    checks = {
        f"mean accuracy >= {GOAL_MEAN}": accuracy.get("mean", 0.0) >= GOAL_MEAN,
        # a type with no questions fails: the goal is about all four
        **{f"{t} accuracy >= {GOAL_EACH}": accuracy.get(t, 0.0) >= GOAL_EACH for t in QUESTION_TYPES},
        **{f"{t} blind within {GOAL_BLIND_MARGIN} of majority": abs(blind.get(t, 0.0) - majority.get(t, 0.0))
           <= GOAL_BLIND_MARGIN for t in QUESTION_TYPES},
    }
    return {"met": all(checks.values()), "checks": checks}


def first_loss_check(trainer_state: dict, vocab_size: int | None) -> dict | None:
    """The first logged training loss beside ln(vocabulary): a from-scratch model starts there."""
    losses, _ = loss_history(trainer_state)
    if not losses:
        return None
    out = {"first_step": losses[0][0], "first_loss": losses[0][1], "last_loss": losses[-1][1]}
    if vocab_size:
        out["ln_vocab"] = math.log(vocab_size)
    return out


def build_metrics(preds, blind, train, caption_metrics=None, leakage=None, loss=None) -> dict:
    """The demo's figures, from `eval.score`: per question type the model, the blind control and the majority
    class (from the training split), each with its mean over the four types, and the goal check."""
    questions = [r for r in preds if r.get("question_type") in QUESTION_TYPES]
    blind_questions = [r for r in blind if r.get("question_type") in QUESTION_TYPES]
    by_type = score_predictions(questions, task="vqa", blind=blind_questions, train=train)["looking"]["by_question_type"]
    accuracy, blind_accuracy, majority = (with_mean({t: row[name] for t, row in by_type.items()})
                                          for name in ("model", "blind", "majority"))
    metrics = {
        "accuracy": accuracy,
        "blind_accuracy": blind_accuracy,
        "majority_accuracy": majority,
        "num_questions": {t: sum(1 for r in questions if r["question_type"] == t) for t in QUESTION_TYPES},
        "goal": goal_check(accuracy, blind_accuracy, majority),
    }
    if loss:
        metrics["training_loss"] = loss
    if caption_metrics:
        metrics["caption"] = caption_metrics
    if leakage is not None:
        metrics["shared_images_across_splits"] = leakage
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    acc, blind, major = metrics["accuracy"], metrics["blind_accuracy"], metrics["majority_accuracy"]
    types = ", ".join(f"{t} {acc.get(t, 0):.2f}" for t in QUESTION_TYPES)
    missed = [name for name, ok in metrics["goal"]["checks"].items() if not ok]
    verdict = "goal met" if metrics["goal"]["met"] else "goal missed: " + "; ".join(missed)
    return [f"trained model: mean accuracy {acc['mean']:.2f} ({types})",
            f"blind control (blank images): mean {blind['mean']:.2f}; majority class: mean {major['mean']:.2f}; "
            f"{verdict}"]


def write_markdown(metrics: dict, plots: dict[str, str], out_dir: str, notes: list[str]) -> str:
    rows = ["| question type | trained | blind | majority | questions |", "|---|---|---|---|---|"]
    for t in (*QUESTION_TYPES, "mean"):
        rows.append(f"| {t} | {metrics['accuracy'].get(t, 0):.3f} | {metrics['blind_accuracy'].get(t, 0):.3f} | "
                    f"{metrics['majority_accuracy'].get(t, 0):.3f} | {metrics['num_questions'].get(t, '')} |")
    parts = ["# Demo report: does the model look at the image?", "", *summary_lines(metrics), "", *rows, ""]
    parts += ["Goal: mean accuracy >= 0.80, every type >= 0.60, blind within 0.05 of the majority class.", ""]
    parts += [f"- {'yes' if ok else 'NO '} {name}" for name, ok in metrics["goal"]["checks"].items()] + [""]
    loss = metrics.get("training_loss")
    if loss:
        vocab = f" (ln vocabulary = {loss['ln_vocab']:.2f})" if "ln_vocab" in loss else ""
        parts += [f"Training loss: {loss['first_loss']:.3f} at step {loss['first_step']}{vocab}, "
                  f"{loss['last_loss']:.3f} at the end.", ""]
    if "shared_images_across_splits" in metrics:
        parts += [f"Images shared across train/val/test: {metrics['shared_images_across_splits']} "
                  "(partitioned by image, content hash and perceptual hash).", ""]
    if "caption" in metrics:
        caption = metrics["caption"]
        keys = [k for k in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr") if k in caption]
        parts += ["## Captions (pycocoevalcap)", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                  "| " + " | ".join(f"{caption[k]:.3f}" for k in keys) + " |", ""]
    parts += [f"![{name}]({os.path.basename(path)})" for name, path in plots.items()] + [""] + notes
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


def _read_json(path: str | None):
    """The file's JSON, or None when no path was given or the file is not there (optional inputs)."""
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preds", required=True)
    parser.add_argument("--blind-preds", required=True)
    parser.add_argument("--train", required=True, help="training split (for the majority class)")
    parser.add_argument("--trainer-state", default=None, help="the model's trainer_state.json (loss curve)")
    parser.add_argument("--model-config", default=None, help="the model's config.json (vocabulary size)")
    parser.add_argument("--caption-metrics", default=None, help="metrics.json of eval.score on the predictions")
    parser.add_argument("--leakage", default=None, help="partition's leakage_report.json")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with open(args.train) as f:  # required
        train = json.load(f)
    scored = _read_json(args.caption_metrics)
    caption = None
    if scored:
        caption = {k: v for k, v in scored.get("caption", scored).items() if isinstance(v, (int, float))}
    leakage = (_read_json(args.leakage) or {}).get("shared_images")
    state, config = _read_json(args.trainer_state), _read_json(args.model_config)
    vocab_size = config.get("text_config", config).get("vocab_size") if config else None
    loss = first_loss_check(state, vocab_size) if state else None
    metrics = build_metrics(load_predictions(args.preds), load_predictions(args.blind_preds), train, caption,
                            leakage, loss)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plots = {"accuracy by question type": plot_accuracy_bars(
        {"trained": metrics["accuracy"], "blind": metrics["blind_accuracy"], "majority": metrics["majority_accuracy"]},
        os.path.join(args.out, "accuracy_by_type.png"), title="Trained vs blind vs majority class")}
    if args.trainer_state and os.path.isfile(args.trainer_state):
        plots["loss"] = plot_loss_curve(args.trainer_state, os.path.join(args.out, "loss_curve.png"))
    write_markdown(metrics, plots, args.out, args.note)
    print("\n".join(summary_lines(metrics)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
