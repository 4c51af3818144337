"""A NaN/inf loss, injected for real: a stage-1 projector whose weights are inf, passed as
--pretrain_mm_mlp_adapter. With the projector frozen, every batch with an image gives a NaN loss
while text-only batches train normally; sequential sampling puts the 4 text samples first, so
steps 1-2 are good and steps 3-6 (images) are poisoned. With the projector trained, even a
text-only batch (which runs a blank image through it, scattered nowhere) has a finite loss but
NaN projector gradients (0 * inf)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from faultlib import color_samples, one_thread, text_samples, train_argv, train_in_process, trainer_state, write_samples
from llava_tiny.model.builder import assemble_model
from llava_tiny.model.checkpoint_kinds import PROJECTOR
from llava_tiny.model.checkpoints import save_checkpoint
from llava_tiny.train.callbacks import NonFiniteLossError

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture(scope="module")
def poisoned_projector(tmp_path_factory, tiny_parts):
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    with torch.no_grad():
        for param in loaded.model.model.multi_modal_projector.parameters():
            param.fill_(float("inf"))
    folder = str(tmp_path_factory.mktemp("poisoned"))
    save_checkpoint(PROJECTOR, loaded.model, loaded.processor, folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan_data")
    return write_samples(root, text_samples(4) + color_samples(root, 8))


def _argv(tiny_parts, data, out, poisoned_projector, *flags):
    return train_argv(tiny_parts, data, out, "--max_steps", "6", "--train_sampling_strategy", "sequential",
                      "--pretrain_mm_mlp_adapter", poisoned_projector, "--save_strategy", "steps",
                      "--freeze_mm_mlp_adapter", "True", *flags)


def test_nan_loss_stops_with_step_sample_ids_and_last_good_checkpoint(tmp_path, tiny_parts, data, poisoned_projector):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError) as err:
        train_in_process(_argv(tiny_parts, data, out, poisoned_projector, "--save_steps", "1"))
    message = str(err.value)
    assert message.startswith("step 3: the training loss is nan for samples ['img-0', 'img-1']"), message
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in message
    assert "--skip_nan_steps True" in message
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in weights.items() if "projector" not in k)

    # What the message suggests: the same command with --skip_nan_steps True resumes (not "another run").
    train_in_process(_argv(tiny_parts, data, out, poisoned_projector, "--save_steps", "1", "--skip_nan_steps", "True"))
    assert trainer_state(out)["global_step"] == 6
    assert [s["step"] for s in json.load(open(out / "skipped_steps.json"))] == [3, 4, 5, 6]


def test_skip_nan_steps_drops_the_poisoned_updates_and_counts_them(tmp_path, tiny_parts, data, poisoned_projector,
                                                                 capfd):
    out = tmp_path / "out"
    train_in_process(_argv(tiny_parts, data, out, poisoned_projector, "--save_steps", "2", "--skip_nan_steps", "True"))
    assert trainer_state(out)["global_step"] == 6
    skipped = json.load(open(out / "skipped_steps.json"))
    assert [(s["step"], s["sample_ids"]) for s in skipped] == [
        (3, ["img-0", "img-1"]), (4, ["img-2", "img-3"]), (5, ["img-4", "img-5"]), (6, ["img-6", "img-7"])]
    assert "4 step(s) skipped so far" in capfd.readouterr().err
    # No optimizer update after step 2: the final weights are exactly those of checkpoint-2.
    final = load_file(str(out / "model.safetensors"))
    at_step_2 = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert final.keys() == at_step_2.keys()
    for key in final:
        assert torch.equal(final[key], at_step_2[key]), key
    assert all(torch.isfinite(v).all() for k, v in final.items() if "projector" not in k)


def test_finite_loss_with_nan_gradients_stops_before_the_update(tmp_path, tiny_parts, data, poisoned_projector):
    argv = _argv(tiny_parts, data, tmp_path / "out", poisoned_projector, "--save_steps", "1",
                 "--freeze_mm_mlp_adapter", "False")
    with pytest.raises(NonFiniteLossError) as err:
        train_in_process(argv)
    assert str(err.value).startswith("step 1: the loss is finite but its gradients are NaN/inf for samples "
                                      "['txt-0', 'txt-1']. Nothing from this step was applied; the last good "
                                      "checkpoint is none (no checkpoint was saved yet)"), str(err.value)
