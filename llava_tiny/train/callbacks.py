"""Callbacks that keep a run honest when something goes wrong mid-training.

- SIGTERM/SIGUSR1 (a scheduler's preemption notice): save a checkpoint at the next step boundary,
  stop, exit 0; the same command resumes from it (`PreemptionCallback`).
- A NaN/inf loss (or NaN/inf gradients) stops the run with the step, the batch's sample ids and
  the last good checkpoint, or with `--skip_nan_steps` drops that optimizer step and records it
  (`NonFiniteLossGuard`).

Every process takes the same decision (`on_any_process`): a process that stops or skips alone
leaves the others waiting forever in the next collective.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from typing import Callable

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SKIPPED_STEPS_FILE = "skipped_steps.json"


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
