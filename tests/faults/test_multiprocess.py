"""Faults of a job of two DeepSpeed ranks (CPU, gloo), launched as the GPU scripts launch it, each
injected for real from the test side: a rank SIGKILLed mid-step, a rank that hangs, a resume on another
number of processes, SIGTERM to the whole job, a tampered DeepSpeed pickle, a full disk on one rank.

Every run is bounded (`timeout`) and its whole process group is killed afterwards."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from faultlib import REPO, color_samples, read, subprocess_env, text_samples, trainer_state, write_samples
from llava_tiny.train.resume import ResumeError, check_global_batch
from llava_tiny.train.run_dir import newest_checkpoint

pytestmark = pytest.mark.slow

# The training script the launcher starts when a fault is injected: the real train(), with the fault
# (FAULTS, JSON: [{"rank": R, "step": S, "do": "kill" | "sleep" | "enospc", "seconds": T}]) patched in.
INJECTING_TRAIN = """
import errno, json, os, signal, time
import torch
from llava_tiny.train.trainer import LlavaTrainer
from llava_tiny.train.train import train

rank, faults = int(os.environ["RANK"]), json.loads(os.environ["FAULTS"])
faults = [f for f in faults if f["rank"] == rank]
training_step, save = LlavaTrainer.training_step, torch.save

def faulty_training_step(self, *args, **kwargs):
    for fault in faults:
        if fault["step"] == self.state.global_step + 1 and fault["do"] in ("kill", "sleep") and not fault.get("done"):
            fault["done"] = True
            print(f"FAULT rank {rank} step {fault['step']}: {fault['do']} pid {os.getpid()} at {time.time()}", flush=True)
            if fault["do"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(fault["seconds"])
    return training_step(self, *args, **kwargs)

def full_disk_save(obj, f, *args, **kwargs):
    for fault in faults:
        if fault["do"] == "enospc" and isinstance(f, str) and f"global_step{fault['step']}" in f:
            print(f"FAULT rank {rank}: no space left for {f}", flush=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
    return save(obj, f, *args, **kwargs)

LlavaTrainer.training_step, torch.save = faulty_training_step, full_disk_save
train()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(tiny_parts, data, out, processes=2, zero="zero2", script="llava_tiny/train/train_mem.py", *flags):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", str(processes), "--master_port", str(_free_port()), script,
            "--deepspeed", f"zero_configs/{zero}.json", "--model_name_or_path", tiny_parts["llm"],
            "--vision_tower", tiny_parts["clip"], "--data_path", data["data_path"], "--image_folder",
            data["image_folder"], "--output_dir", str(out), "--per_device_train_batch_size", "2",
            "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "linear", "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0",
            "--ddp_timeout", "60", *map(str, flags)]


@contextlib.contextmanager
def job(cmd, log_path, faults=None, tmp_path=None, **extra_env):
    """The launcher and its ranks in a process group of their own; killed, all of them, on the way out."""
    env = subprocess_env(DS_ACCELERATOR="cpu", **extra_env)
    if faults is not None:
        script = os.path.join(str(tmp_path), "injecting_train.py")
        with open(script, "w") as f:
            f.write(INJECTING_TRAIN)
        cmd = [script if part == "llava_tiny/train/train_mem.py" else part for part in cmd]
        env["FAULTS"] = json.dumps(faults)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_group(proc, timeout) -> float:
    """Wait until the launcher and every rank are gone (a rank can outlive the runner); the seconds taken."""
    start, deadline = time.time(), time.time() + timeout
    while time.time() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return time.time() - start
        time.sleep(0.2)
    raise AssertionError(f"the job was still running after {timeout} s")


def run_job(cmd, log_path, timeout=420, **kwargs) -> tuple[int, str]:
    with job(cmd, log_path, **kwargs) as proc:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"timed out after {timeout} s:\n{read(log_path)[-4000:]}") from None
        wait_group(proc, 60)
    return proc.returncode, read(log_path)


def fault_time(log: str) -> float:
    return float(next(line for line in log.splitlines() if line.startswith("FAULT")).rsplit(" at ", 1)[1])


def steps_logged(log: str) -> int:
    return log.count("{'loss'")


def weights(folder) -> dict:
    return load_file(os.path.join(str(folder), "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol=1e-4) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-3, msg=key)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_data")
    return write_samples(root, color_samples(root, 12) + text_samples(4))


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory, tiny_parts, data):
    """Rank 1 SIGKILLed in step 3 of 4 (checkpoints 1 and 2 complete); then the same command again."""
    root = tmp_path_factory.mktemp("killed")
    cmd = command(tiny_parts, data, root / "out", 2, "zero2", "llava_tiny/train/train_mem.py", "--max_steps", 4)
    killed_code, killed_log = None, None
    with job(cmd, root / "killed.log", faults=[{"rank": 1, "step": 3, "do": "kill"}], tmp_path=root) as proc:
        proc.wait(timeout=420)
        ended = time.time()
        wait_group(proc, 60)
        killed_code, killed_log = proc.returncode, read(root / "killed.log")
    shutil.copytree(root / "out" / "checkpoint-2", root / "checkpoint-2")  # for the other tests, untouched
    rerun_code, rerun_log = run_job(cmd, root / "rerun.log")
    return {"root": root, "out": root / "out", "killed": (killed_code, killed_log, ended), "rerun": (rerun_code, rerun_log)}


def test_a_rank_killed_mid_step_ends_the_job_naming_it_and_the_rerun_resumes(killed_then_rerun):
    code, log, ended = killed_then_rerun["killed"]
    out = killed_then_rerun["out"]
    assert code != 0, log[-3000:]
    assert ended - fault_time(log) < 60, f"the job took {ended - fault_time(log):.0f} s to end after the kill"
    assert f"rank 1 died (its process" in log and f"The last complete checkpoint is {out / 'checkpoint-2'}" in log, \
        log[-4000:]
    code, log = killed_then_rerun["rerun"]
    assert code == 0, log[-4000:]
    assert f"resuming the interrupted run from {out / 'checkpoint-2'}" in log
    state = trainer_state(out)
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


def test_resumed_on_one_process_through_a_universal_checkpoint_continues_exactly(killed_then_rerun, tiny_parts, data,
                                                                                 tmp_path):
    """ZeRO-2, full fine-tuning: written by 2 ranks, resumed on 1 with the same global batch (2 x 2 x 1 =
    1 x 2 x 2); the weights after steps 3-4 equal those of the 2-rank rerun: optimizer state, schedule and
    data position all continued."""
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(killed_then_rerun["root"] / "checkpoint-2", checkpoint)
    cmd = command(tiny_parts, data, tmp_path / "out", 1, "zero2", "llava_tiny/train/train_mem.py", "--max_steps", 4,
                  "--gradient_accumulation_steps", 2, "--resume_from_checkpoint", checkpoint)
    code, log = run_job(cmd, tmp_path / "one.log")
    assert code == 0, log[-4000:]
    assert "converting" in log and "to DeepSpeed's universal checkpoint format" in log
    assert (checkpoint / "latest_universal").is_file()
    assert steps_logged(log) == 2  # steps 3 and 4: not restarted from step 0
    assert [e["step"] for e in trainer_state(tmp_path / "out")["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert_same_weights(weights(tmp_path / "out"), weights(killed_then_rerun["out"]))


def test_resumed_on_two_processes_zero3_lora_continues_exactly(tiny_parts, data, tmp_path):
    """ZeRO-3 + LoRA: written by 1 rank (1 x 2 x 2), resumed on 2 (2 x 2 x 1); compared with the 1-rank run.
    No LoRA dropout: a rank the checkpoint had no RNG state for draws other dropout masks."""
    lora = ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", 0, "--max_steps", 4]
    one = command(tiny_parts, data, tmp_path / "one", 1, "zero3", "llava_tiny/train/train_mem.py", *lora,
                  "--gradient_accumulation_steps", 2)
    code, log = run_job(one, tmp_path / "one.log")
    assert code == 0, log[-4000:]
    two = command(tiny_parts, data, tmp_path / "two", 2, "zero3", "llava_tiny/train/train_mem.py", *lora,
                  "--resume_from_checkpoint", tmp_path / "one" / "checkpoint-2")
    code, log = run_job(two, tmp_path / "two.log")
    assert code == 0, log[-4000:]
    assert "to DeepSpeed's universal checkpoint format" in log
    assert steps_logged(log) == 2
    assert [e["step"] for e in trainer_state(tmp_path / "two")["log_history"] if "loss" in e] == [1, 2, 3, 4]
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        assert_same_weights(load_file(str(tmp_path / "two" / name)), load_file(str(tmp_path / "one" / name)))


def test_another_global_batch_stops_and_names_the_flag_to_pass(killed_then_rerun):
    class OneProcess:  # what the flags of a rerun on one process give
        world_size, per_device_train_batch_size, gradient_accumulation_steps = 1, 2, 1

    with pytest.raises(ResumeError, match=r"global batch of 4 \(2 process\(es\) x 2 per device x 1 accumulation steps\)"
                                          r".*pass --gradient_accumulation_steps 2"):
        check_global_batch(str(killed_then_rerun["root"] / "checkpoint-2"), OneProcess())


def test_a_hung_rank_ends_the_job_within_ddp_timeout_with_every_rank_stack(tiny_parts, data, tmp_path):
    """Rank 1 is slow in step 4 (logged), then blocks before step 6's collectives; --ddp_timeout 30."""
    cmd = command(tiny_parts, data, tmp_path / "out", 2, "zero2", "llava_tiny/train/train_mem.py", "--max_steps", 8,
                  "--save_strategy", "no", "--ddp_timeout", 30)
    faults = [{"rank": 1, "step": 4, "do": "sleep", "seconds": 6}, {"rank": 1, "step": 6, "do": "sleep", "seconds": 3600}]
    with job(cmd, tmp_path / "hang.log", faults=faults, tmp_path=tmp_path) as proc:
        proc.wait(timeout=420)
        ended = time.time()
        wait_group(proc, 60)
    log = read(tmp_path / "hang.log")
    hang_start = float([line for line in log.splitlines() if "step 6: sleep" in line][0].rsplit(" at ", 1)[1])
    assert proc.returncode != 0
    assert ended - hang_start < 30 + 40, f"ended {ended - hang_start:.0f} s after the hang"
    for rank in (0, 1):
        assert f"rank {rank}: no progress for" in log, log[-5000:]
    stacks = {rank: [line for line in log.splitlines() if line.startswith(f"[rank {rank}] ")] for rank in (0, 1)}
    for rank in (0, 1):  # each rank's stack, every line whole although both ranks print at the same moment
        assert any("(most recent call last)" in line for line in stacks[rank]), log[-5000:]
        assert any("in _inner_training_loop" in line for line in stacks[rank]), log[-5000:]
    assert any("in faulty_training_step" in line for line in stacks[1])  # the hung rank shows where it hangs
    assert "step 4 took" in log and "the median step" in log, log[-5000:]


def test_sigterm_to_the_job_saves_the_same_step_on_every_rank_and_the_rerun_loses_no_step(tiny_parts, data, tmp_path):
    """Through scripts/lib/launch.sh, as the training scripts launch: SIGTERM to the script (a scheduler's
    notice) reaches every rank; the script returns 0 only after every rank has saved and exited."""
    out = tmp_path / "out"
    cmd = command(tiny_parts, data, out, 2, "zero2", "llava_tiny/train/train_mem.py", "--max_steps", 30,
                  "--save_strategy", "no")
    assert cmd[5:8] == ["llava_tiny/train/train_mem.py", "--deepspeed", "zero_configs/zero2.json"]
    script = ["bash", "-c", 'source scripts/lib/launch.sh && launch "$@"', "launch", *cmd[8:]]
    env = dict(NUM_GPUS="2", MASTER_PORT=cmd[4], ZERO="zero2")
    with job(script, tmp_path / "term.log", **env) as proc:
        deadline = time.time() + 420
        while steps_logged(read(tmp_path / "term.log")) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # the script only: it passes the signal on to the job
        assert proc.wait(timeout=120) == 0, read(tmp_path / "term.log")[-4000:]
        log = read(tmp_path / "term.log")  # read as the script returns: every rank has finished by then
    saved = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1, log[-4000:]
    step = int(saved[0].split("-")[1])
    for rank in (0, 1):
        assert f"rank {rank}: stopped at step {step} with the checkpoint saved; exiting 0" in log, log[-4000:]
    assert "launch: SIGTERM passed to the job; every rank has exited" in log
    assert trainer_state(out / saved[0])["global_step"] == step
    assert len(list((out / saved[0]).glob("global_step*/*optim_states.pt"))) == 2  # both ranks' parts
    with job(script, tmp_path / "rerun.log", **env) as proc:  # the same command
        assert proc.wait(timeout=420) == 0, read(tmp_path / "rerun.log")[-4000:]
    assert [e["step"] for e in trainer_state(out)["log_history"] if "loss" in e] == list(range(1, 31))


def _code_running_pickle(path, target) -> None:
    class CreatesAFile:
        def __reduce__(self):
            return (open, (str(target), "w"))

    torch.save({"module": {}, "x": CreatesAFile()}, str(path))


def test_a_tampered_deepspeed_pickle_is_refused_without_running_it(killed_then_rerun, tiny_parts, data, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(killed_then_rerun["root"] / "checkpoint-2", checkpoint)
    tampered, target = checkpoint / "global_step2" / "mp_rank_00_model_states.pt", tmp_path / "created-by-the-pickle"
    _code_running_pickle(tampered, target)
    cmd = command(tiny_parts, data, tmp_path / "out", 2, "zero2", "llava_tiny/train/train_mem.py", "--max_steps", 4,
                  "--resume_from_checkpoint", checkpoint)
    code, log = run_job(cmd, tmp_path / "tampered.log")
    assert code != 0
    assert f"refusing to resume from {checkpoint}: {tampered}" in log, log[-4000:]
    assert not target.exists()


def test_disk_full_on_one_rank_leaves_no_checkpoint_that_resume_would_pick(tiny_parts, data, tmp_path):
    """Rank 1 cannot write its optimizer shard of checkpoint-2: it stops with the path and bytes; rank 0,
    left waiting in DeepSpeed's barrier, is ended naming it; checkpoint-2 is never published."""
    out = tmp_path / "out"
    cmd = command(tiny_parts, data, out, 2, "zero2", "llava_tiny/train/train_mem.py", "--max_steps", 3)
    code, log = run_job(cmd, tmp_path / "full.log", faults=[{"rank": 1, "step": 2, "do": "enospc"}], tmp_path=tmp_path)
    assert code != 0
    assert f"disk full while saving to {out / 'tmp-checkpoint-2'}" in log and "bytes needed" in log, log[-4000:]
    assert f"the last complete checkpoint, {out / 'checkpoint-1'}, is intact" in log
    assert f"rank 1 died" in log and f"The last complete checkpoint is {out / 'checkpoint-1'}" in log, log[-4000:]
    assert not (out / "checkpoint-2").exists()
    assert newest_checkpoint(str(out)) == str(out / "checkpoint-1")
