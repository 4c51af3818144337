"""Faults that must lose nothing and say what happened.

- Checkpoints appear only when complete: the Trainer writes `tmp-checkpoint-N/checkpoint-N/`,
  renamed to `checkpoint-N` once weights, optimizer and `trainer_state.json` are all on disk. A
  kill during the write leaves only the `tmp-` folder, which rotation (`save_total_limit`) and
  resume never see; the next run removes it.
- A full disk (or quota) while saving becomes `DiskFullError`, naming the path, the bytes needed
  and the last complete checkpoint, which is left intact.
- SIGTERM/SIGUSR1 (a scheduler's preemption notice): save a checkpoint at the next step boundary,
  stop, exit 0; the same command resumes from it.
- A NaN/inf loss (or NaN/inf gradients) stops the run with the step, the batch's sample ids and
  the last good checkpoint, or with `--skip_nan_steps` drops that optimizer step and records it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-checkpoint-"
SKIPPED_STEPS_FILE = "skipped_steps.json"


# --- checkpoints appear only when complete -------------------------------------------------------
def staging_dir(run_dir: str, step: int) -> str:
    """Where checkpoint-`step` is written before it is complete (HF writes `<this>/checkpoint-N/`)."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{step}")


def publish_checkpoint(staged: str, final: str) -> None:
    """Rename a complete checkpoint into place (one rename: atomic on one filesystem)."""
    if os.path.exists(final):  # the same step saved twice: swap, so a complete copy exists at every moment
        replaced = os.path.join(os.path.dirname(final), STAGING_PREFIX + "replaced-" + os.path.basename(final))
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        os.rename(staged, final)
        shutil.rmtree(replaced)
    else:
        os.rename(staged, final)


def incomplete_checkpoints(run_dir: str) -> list[str]:
    """Checkpoints whose write was cut short (a kill, a full disk): `tmp-checkpoint-*` folders."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(os.path.join(run_dir, name) for name in os.listdir(run_dir) if name.startswith(STAGING_PREFIX))


def remove_incomplete_checkpoints(run_dir: str) -> None:
    """Delete what interrupted saves left behind (never loadable, and they hold disk space)."""
    for path in incomplete_checkpoints(run_dir):
        logger.warning("removing %s: an incomplete checkpoint left by an interrupted save (resume ignores it)", path)
        shutil.rmtree(path, ignore_errors=True)


PREVIOUS_RUN_PREFIX = "previous-run-"


def set_aside_previous_run(run_dir: str) -> str | None:
    """--overwrite_output_dir: move what the folder holds into `previous-run-N/` (nothing deleted), so
    the new run neither resumes from nor rotates away the old run's checkpoints."""
    if not os.path.isdir(run_dir):
        return None
    entries = [name for name in os.listdir(run_dir) if not name.startswith(PREVIOUS_RUN_PREFIX)]
    if not entries:
        return None
    taken = {name for name in os.listdir(run_dir) if name.startswith(PREVIOUS_RUN_PREFIX)}
    number = 1
    while f"{PREVIOUS_RUN_PREFIX}{number}" in taken:
        number += 1
    target = os.path.join(run_dir, f"{PREVIOUS_RUN_PREFIX}{number}")
    os.makedirs(target)
    for name in entries:
        os.rename(os.path.join(run_dir, name), os.path.join(target, name))
    logger.warning("--overwrite_output_dir: moved what %s held into %s; the new run starts from scratch",
                   run_dir, target)
    return target


# Test-only hook: the fault tests SIGKILL a real run while it writes a checkpoint. With
# LLAVA_TINY_TEST_SLOW_SAVE=N the save of checkpoint-N sleeps after its weights are written and
# before the optimizer state and trainer_state.json, so the kill lands mid-write.
SLOW_SAVE_ENV = "LLAVA_TINY_TEST_SLOW_SAVE"


def pause_mid_save_for_tests(step: int) -> None:
    if os.environ.get(SLOW_SAVE_ENV) == str(step):
        logger.warning("%s=%d: pausing inside the save of checkpoint-%d (test hook)", SLOW_SAVE_ENV, step, step)
        time.sleep(120)


# --- a full disk is named as such ----------------------------------------------------------------
class DiskFullError(OSError):
    """Not enough space to save; the message names the path, the bytes needed and the last good checkpoint."""


_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors (each storage counted once: tied weights are saved once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def _free_bytes(path: str) -> int:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def _is_disk_full(err: BaseException, free: int, needed: int) -> bool:
    code = getattr(err, "errno", None)
    if code is not None:
        return code in (errno.ENOSPC, errno.EDQUOT)
    if any(text in str(err).lower() for text in _DISK_FULL_TEXT):  # safetensors' Rust error carries no errno
        return True
    # torch.save on a full disk says only "unexpected pos ..." / "file write failed": judge by the space left.
    return isinstance(err, RuntimeError) and free < needed


@contextlib.contextmanager
def explain_disk_full(path: str, bytes_needed: Callable[[], int], last_good: str | None, partial: str | None = None):
    """Turn a write that failed on a full disk into `DiskFullError` naming `path`, the bytes needed and
    `last_good`; `partial` (the half-written checkpoint) is removed to give its space back."""
    try:
        yield
    except Exception as err:
        needed = bytes_needed()
        if isinstance(err, DiskFullError) or not _is_disk_full(err, _free_bytes(path), needed):
            raise
        if partial:
            shutil.rmtree(partial, ignore_errors=True)
        kept = (f"the last complete checkpoint, {last_good}, is intact" if last_good
                else "no complete checkpoint was saved before this one")
        raise DiskFullError(
            errno.ENOSPC,
            f"disk full while saving to {path}: about {needed:,} bytes needed ({needed / 2**20:.1f} MiB of weights "
            f"and optimizer state), {_free_bytes(path):,} bytes free there now; {kept}. Free some space (or use "
            f"another --output_dir) and rerun the same command to resume ({type(err).__name__}: {err})") from err


# --- every process takes the same decision -------------------------------------------------------
def on_any_process(flag: bool, device) -> bool:
    """True when `flag` is true on any process: a process that stops or skips alone leaves the others
    waiting forever in the next collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# --- preemption ----------------------------------------------------------------------------------
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM/SIGUSR1, save a checkpoint at the next step boundary and stop training.

    `train()` installs the handlers around `trainer.train()` (`with callback.handling_signals():`),
    then exits 0 without the final save, so rerunning the same command resumes from the checkpoint.
    A second signal changes nothing: the save is already coming, and a SIGKILL that follows cannot
    damage the previous checkpoint.
    """

    def __init__(self):
        self.received: str | None = None  # name of the signal
        self.stopped_at: int | None = None  # step whose checkpoint was saved on the signal

    def _on_signal(self, signum, frame) -> None:  # only set a flag: a handler may interrupt anything
        self.received = signal.Signals(signum).name

    @contextlib.contextmanager
    def handling_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None and on_any_process(self.received is not None, args.device):
            logger.warning("%s received: saving checkpoint-%d and stopping",
                           self.received or "a signal on another process", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class IgnorePreemptionInWorkers:
    """A dataloader `worker_init_fn` wrapper: workers ignore SIGTERM/SIGUSR1.

    A scheduler signals every process of the job; torch's worker handler dies on a SIGTERM that its
    parent did not send, and the training process then fails ("DataLoader worker ... is killed")
    before it can save. The training process handles the signal and shuts its workers down itself.
    """

    def __init__(self, init_fn=None):
        self.init_fn = init_fn

    def __call__(self, worker_id: int) -> None:
        for s in PREEMPTION_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if self.init_fn is not None:
            self.init_fn(worker_id)


# --- NaN / inf loss --------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
    """A NaN/inf training loss; the message names the step, the batch's sample ids and the last good checkpoint."""


class NonFiniteLossGuard(TrainerCallback):
    """Nothing non-finite is ever applied. A NaN/inf loss, or NaN/inf gradients from a finite loss
    (0 * inf through a poisoned layer), stop the run naming the step, its sample ids and the last good
    checkpoint; with `skip` (--skip_nan_steps) that optimizer step is dropped and recorded instead.

    The loss is checked in `LlavaTrainer.compute_loss`, before backward, so a stop applies nothing
    (under DeepSpeed too); the gradients just before `optimizer.step()`. A dropped step loses every
    gradient (optimizers leave a parameter without one, and its state, untouched), is logged and is
    listed in `skipped_steps.json` in the output dir.
    """

    def __init__(self, skip: bool, report_dir: str | None, last_checkpoint: Callable[[], str | None],
                 write_report: bool = True):
        self.skip = skip
        self.last_checkpoint = last_checkpoint
        self.report_path = os.path.join(report_dir, SKIPPED_STEPS_FILE) if report_dir and write_report else None
        self.skipped: list[dict] = []
        self._step_ids: list[str] = []  # sample ids of the current step's micro-batches
        self._bad: dict | None = None  # the current step, once found non-finite (with skip)

    def check(self, loss: torch.Tensor, step: int, sample_ids: list[str]) -> None:
        """Called with each micro-batch's training loss, before backward."""
        self._step_ids += list(sample_ids)
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        if on_any_process(local_bad, loss.device):
            value = f"{loss.detach().float().mean().item()}" if local_bad else "finite here but not on another process"
            self._found(step, f"the training loss is {value}", list(sample_ids) if local_bad else [])

    def _found(self, step: int, problem: str, sample_ids: list[str]) -> None:
        if not self.skip:
            checkpoint = self.last_checkpoint()
            raise NonFiniteLossError(
                f"step {step}: {problem} for samples {sample_ids}. Nothing from this step was applied; the last good "
                f"checkpoint is {checkpoint or 'none (no checkpoint was saved yet)'}. Check those samples, lower the "
                "learning rate, or pass --skip_nan_steps True to skip such steps")
        if self._bad is None:
            self._bad = {"step": step, "problem": problem, "sample_ids": sample_ids}
        else:
            self._bad["sample_ids"] += sample_ids

    def on_train_begin(self, args, state, control, **kwargs):
        # Resumed: keep the records of steps before the checkpoint; later ones will be run again.
        if self.report_path and os.path.isfile(self.report_path):
            with open(self.report_path) as f:
                self.skipped = [entry for entry in json.load(f) if entry["step"] <= state.global_step]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # With fp16 the GradScaler expects overflowing gradients now and then, and skips those steps itself.
        scaler = getattr(optimizer, "scaler", None)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if self._bad is None and scaler is None and grads:
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if on_any_process(not finite, grads[0].device):
                self._found(state.global_step + 1, "the loss is finite but its gradients are NaN/inf", self._step_ids)
        if self._bad is None:
            return
        for param in model.parameters():
            if param.grad is not None:
                if scaler is not None:  # the scaler then skips the step (it asserts if there are no gradients)
                    param.grad.fill_(float("nan"))
                else:
                    param.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        self._step_ids = []
        if self._bad is None:
            return
        self.skipped.append(self._bad)
        self._bad = None
        logger.warning("step %d skipped (--skip_nan_steps): %s for samples %s; %d step(s) skipped so far",
                       self.skipped[-1]["step"], self.skipped[-1]["problem"], self.skipped[-1]["sample_ids"],
                       len(self.skipped))
        if self.report_path:
            os.makedirs(os.path.dirname(self.report_path), exist_ok=True)
            with open(self.report_path, "w") as f:
                json.dump(self.skipped, f, indent=2)
