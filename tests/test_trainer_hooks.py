"""The HF Trainer's private methods that our trainers override or call (it offers no public hook for
them) still have the signature they were checked against: a transformers release that changes one
fails here, not in the middle of somebody's run."""
import inspect

import pytest
from transformers import Trainer

from llava_tiny.train.dpo_trainer import DPOTrainer
from llava_tiny.train.trainer import LlavaTrainer

CHECKED_AGAINST = "transformers 5.25.0"  # named in the comment of every private override

# name -> the parameters (name, default) our override or call expects; inspect.Parameter.empty: none.
NONE = inspect.Parameter.empty
OVERRIDDEN = {
    "_get_train_sampler": [("self", NONE), ("train_dataset", None)],
    "_save_checkpoint": [("self", NONE), ("model", NONE), ("trial", NONE)],
    "_get_output_dir": [("self", NONE), ("trial", NONE)],
    "_save": [("self", NONE), ("output_dir", None), ("state_dict", None)],
    "_load_from_checkpoint": [("self", NONE), ("resume_from_checkpoint", NONE), ("model", None)],
    "_load_best_model": [("self", NONE)],
}
CALLED = {  # called by LlavaTrainer.evaluate and .prepared_batches
    "_wrap_model": [("self", NONE), ("model", NONE), ("training", True), ("dataloader", None)],
    "_prepare_inputs": [("self", NONE), ("inputs", NONE)],
}


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("name", sorted(OVERRIDDEN) + sorted(CALLED))
def test_the_trainers_private_method_has_the_signature_we_rely_on(name):
    expected = {**OVERRIDDEN, **CALLED}[name]
    assert _parameters(getattr(Trainer, name)) == expected, (
        f"transformers.Trainer.{name} changed since {CHECKED_AGAINST}: check what our trainers do with it")
    if name in OVERRIDDEN:  # and the Trainer calls our override as it would call its own
        assert _parameters(getattr(LlavaTrainer, name)) == expected


@pytest.mark.parametrize("trainer", [LlavaTrainer, DPOTrainer])
def test_every_private_override_is_listed_and_names_the_version_it_was_checked_against(trainer):
    overrides = {name for cls in trainer.__mro__ if issubclass(cls, LlavaTrainer) for name in vars(cls)
                 if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert overrides == set(OVERRIDDEN)
    for name in overrides:
        assert CHECKED_AGAINST in (inspect.getcomments(getattr(trainer, name)) or ""), name
