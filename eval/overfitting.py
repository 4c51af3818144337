"""Is the model reciting its training set? Copied captions, and an eval loss that rises while training's falls.

- `caption_copying`: how many predicted captions are a training caption word for word (and how many
  of those happen to equal their own reference), and how many distinct captions the model and its
  blind copy give. A model that copies answers every image with one of a few memorised sentences.
- the training log: `trainer_state.json`'s `log_history` as the Hugging Face Trainer writes it
  (`loss_history`), and `eval_loss_rising`, the warning that the eval loss passed its best while the
  training loss kept falling, naming the best step.
"""
from __future__ import annotations

import glob
import json
import os
import re

from eval.caption_metrics import simple_tokenize
from eval.inputs import CAPTION, kind_labelled, task_of

RISE_TOLERANCE = 0.02  # an eval loss within 2% of its best is noise, not a rise


# --- copied captions --------------------------------------------------------------------------

def same_words(caption: str) -> str:
    """A caption as copying is judged: lower case, punctuation and spacing ignored ("word for word")."""
    return simple_tokenize(caption)


def training_captions(train: list[dict]) -> set[str]:
    """Every answer of the training samples that are captions, or whose kind is not labelled (`same_words`)."""
    captions = set()
    for sample in train:
        if task_of(sample) == CAPTION or not kind_labelled(sample):
            turns = sample.get("conversations") or []
            captions.update(same_words(t["value"]) for t in turns
                            if isinstance(t, dict) and t.get("from") == "gpt" and isinstance(t.get("value"), str))
    return captions


def caption_copying(captions: list[dict], blind_predictions: list[str] | None = None,
                    train: list[dict] | None = None) -> dict:
    """Copying figures of caption lines (`prediction`, `references`): `captions`, `distinct_predictions`,
    `equal_to_own_reference`; with the blind run's predictions `blind_distinct_predictions`; with the
    `train` samples `training_captions`, `equal_to_a_training_caption` and `copied_and_right`."""
    predictions = [same_words(r["prediction"]) for r in captions]
    right = [p in {same_words(ref) for ref in r["references"]} for p, r in zip(predictions, captions)]
    out = {"captions": len(captions), "distinct_predictions": len(set(predictions)),
           "equal_to_own_reference": sum(right)}
    if blind_predictions is not None:
        out["blind_distinct_predictions"] = len({same_words(p) for p in blind_predictions})
    if train is not None:
        known = training_captions(train)
        copied = [p in known for p in predictions]
        out.update(training_captions=len(known), equal_to_a_training_caption=sum(copied),
                   copied_and_right=sum(c and r for c, r in zip(copied, right)))
    return out


# --- the training log -------------------------------------------------------------------------

def _checkpoint_step(path: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", os.path.basename(os.path.dirname(path)))
    return int(match.group(1)) if match else -1


def find_trainer_state(model_dir: str) -> str | None:
    """`model_dir/trainer_state.json`, else the one in the highest-step `model_dir/checkpoint-N/`, else None."""
    direct = os.path.join(model_dir, "trainer_state.json")
    if os.path.isfile(direct):
        return direct
    found = glob.glob(os.path.join(glob.escape(model_dir), "checkpoint-*", "trainer_state.json"))
    found = [p for p in found if _checkpoint_step(p) >= 0]
    return max(found, key=_checkpoint_step) if found else None


def loss_history(state: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train, eval) lists of (step, loss) from a Hugging Face trainer state's `log_history`."""
    history = state.get("log_history", [])
    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    return train, evals


def read_loss_history(trainer_state_path: str) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """`loss_history` of a `trainer_state.json` file."""
    with open(trainer_state_path, encoding="utf-8") as f:
        return loss_history(json.load(f))


def eval_loss_rising(train: list[tuple[float, float]], evals: list[tuple[float, float]]) -> dict | None:
    """None, or the figures and a `warning` when the last eval loss is above its best (by more than
    RISE_TOLERANCE) while the training loss fell after that best step: the model learns its training set
    by heart. Two eval points are enough to say so."""
    if len(evals) < 2 or not train:
        return None
    best_step, best = min(evals, key=lambda point: point[1])
    last_step, last = evals[-1]
    until_best = [loss for step, loss in train if step <= best_step]
    train_at_best, train_last = (until_best or [train[0][1]])[-1], train[-1][1]
    if last <= best * (1 + RISE_TOLERANCE) or train_last >= train_at_best:
        return None
    warning = (f"the eval loss rose from {best:.3g} at step {best_step} (its best) to {last:.3g} at step {last_step} "
               f"while the training loss fell from {train_at_best:.3g} to {train_last:.3g}: after step {best_step} "
               "the model learns its training set by heart. Keep the best weights: train with "
               "`--load_best_model_at_end True` (its `--save_strategy` and `--save_steps` matching the eval ones), "
               f"or stop at step {best_step}.")
    return {"best_step": best_step, "best_eval_loss": best, "last_step": last_step, "last_eval_loss": last,
            "train_loss_at_best": train_at_best, "last_train_loss": train_last, "warning": warning}
