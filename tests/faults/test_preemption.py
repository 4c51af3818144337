"""SIGTERM / SIGUSR1, as a cluster scheduler sends before preempting a job: the run saves a checkpoint
at the next step boundary and exits 0 with a message; the same command resumes from it."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from faultlib import (color_samples, one_thread, read, start_training, text_samples, train_argv, train_in_process,
                      trainer_state, wait_for, write_samples)
from llava_tiny.train.trainer import LlavaTrainer

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt_data")
    return write_samples(root, color_samples(root, 8) + text_samples(4))


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_exits_0_and_the_same_command_resumes(tmp_path, tiny_parts, data, capfd):
    out = tmp_path / "out"
    # --save_strategy no: only the signal saves. A dataloader worker gets the signal too, as on a cluster.
    argv = train_argv(tiny_parts, data, out, "--max_steps", "100", "--dataloader_num_workers", "1")
    log = tmp_path / "run.log"
    proc = start_training(argv, log)
    wait_for(lambda: "'loss'" in read(log), proc, log)  # training has started
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as a scheduler does
    assert proc.wait(timeout=120) == 0, read(log)[-3000:]

    checkpoints = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].split("-")[1])
    assert 1 <= step < 100 and trainer_state(out / checkpoints[0])["global_step"] == step
    message = f"stopped by SIGTERM at step {step} of 100: saved {out / checkpoints[0]}; rerun the same command"
    assert message in read(log)
    assert not (out / "trainer_state.json").exists()  # not mistaken for a finished run

    capfd.readouterr()
    train_in_process(argv)  # the same command again
    assert f"resuming the interrupted run from {out / checkpoints[0]}" in capfd.readouterr().err
    state = trainer_state(out)
    assert state["global_step"] == 100
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 101))  # no step lost or repeated


def test_sigusr1_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, tiny_parts, data, monkeypatch):
    flags = ["--max_steps", "6", "--learning_rate", "5e-3"]
    train_in_process(train_argv(tiny_parts, data, tmp_path / "straight", *flags))

    real_step = LlavaTrainer.training_step

    def signalled_during_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(self, *args, **kwargs)

    handler_before = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(LlavaTrainer, "training_step", signalled_during_step_3)
    out = tmp_path / "out"
    train_in_process(train_argv(tiny_parts, data, out, *flags))  # returns: no exception, no kill
    assert signal.getsignal(signal.SIGUSR1) is handler_before  # train() puts the handlers back
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert not (out / "model.safetensors").exists() and not (out / "trainer_state.json").exists()

    monkeypatch.setattr(LlavaTrainer, "training_step", real_step)
    train_in_process(train_argv(tiny_parts, data, out, *flags, "--resume_from_checkpoint", out / "checkpoint-3"))
    resumed = load_file(str(out / "model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=1e-4)
