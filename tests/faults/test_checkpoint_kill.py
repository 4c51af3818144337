"""SIGKILL while a checkpoint is being written, then the same command again: the previous checkpoint
stays loadable, the partial one is never mistaken for a checkpoint, and the rerun finishes the job
with the weights of an uninterrupted run. A run that dies during its final save is resumed too,
never taken for a finished one."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from faultlib import (color_samples, one_thread, read, run_training, start_training, text_samples, train_argv,
                      train_in_process, trainer_state, wait_for, write_samples)
from llava_tiny.model.builder import load_pretrained_model
from llava_tiny.train import recipes
from llava_tiny.train.run_dir import newest_checkpoint

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

FLAGS = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
         "--lora_enable", "True", "--lora_r", "4", "--learning_rate", "5e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_data")
    return write_samples(root, color_samples(root, 8) + text_samples(4))


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_keeps_the_previous_one_and_the_rerun_resumes(tmp_path, tiny_parts, data):
    out = tmp_path / "out"
    argv = train_argv(tiny_parts, data, out, *FLAGS)
    log = tmp_path / "killed.log"
    proc = start_training(argv, log, pause_in_save_at=4)
    wait_for(lambda: "pausing inside the save of checkpoint-4" in read(log), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # The kill landed mid-write: weights of step 4 on disk, its trainer_state.json not yet.
    partial = out / "tmp-checkpoint-4" / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert newest_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert trainer_state(out / "checkpoint-2")["global_step"] == 2
    assert load_pretrained_model(str(out / "checkpoint-2")).kind == "lora"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):  # named explicitly: refused too
        train_in_process(argv + ["--resume_from_checkpoint", str(partial)])

    code, text = run_training(argv, tmp_path / "rerun.log")  # the same command
    assert code == 0, text[-3000:]
    assert f"resuming the interrupted run from {out / 'checkpoint-2'}" in text
    assert f"removing {out / 'tmp-checkpoint-4'}" in text
    assert trainer_state(out)["global_step"] == 6
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"]  # save_total_limit 1

    train_in_process(train_argv(tiny_parts, data, tmp_path / "straight", *FLAGS))
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        resumed, straight = load_file(str(out / name)), load_file(str(tmp_path / "straight" / name))
        assert resumed.keys() == straight.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=1e-4)


def test_a_run_that_dies_in_its_final_save_is_resumed_not_taken_for_finished(tmp_path, tiny_parts, data,
                                                                            monkeypatch):
    out = tmp_path / "out"
    argv = train_argv(tiny_parts, data, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")
    real_save = recipes.save_checkpoint

    def dies_writing_the_final_weights(kind, model, processor, output_dir, **kwargs):
        if output_dir == str(out):
            raise KeyboardInterrupt("killed during the final save")
        return real_save(kind, model, processor, output_dir, **kwargs)

    monkeypatch.setattr(recipes, "save_checkpoint", dies_writing_the_final_weights)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(argv)
    assert not (out / "trainer_state.json").exists()  # written last: the folder still reads as interrupted
    monkeypatch.setattr(recipes, "save_checkpoint", real_save)
    train_in_process(argv)  # checkpoint-2 is the last step: it becomes the final model, with no step past it
    assert trainer_state(out)["global_step"] == 2
    final, last = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert load_pretrained_model(str(out)).kind == "full"

