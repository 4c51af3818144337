"""The output folder of a run, and its one owner, `RunFolder`: where checkpoints appear, which one a
rerun resumes from, what marks a run finished, and what a full disk, a killed save or a finished run
leave there. The trainer asks it; nothing else writes the folder's layout.

- Checkpoints appear only when complete: `checkpoint-N` is written as `tmp-checkpoint-N/checkpoint-N/`
  (with `run_shape.json`, how it was trained) and renamed into place once weights, optimizer state and
  `trainer_state.json` are all on disk. A kill during the write leaves only the `tmp-` folder, which
  rotation (`save_total_limit`) and resume never see; the next run removes it.
- A finished run is marked by `trainer_state.json` in the folder itself, written after the final model.
- The same command, rerun, resumes from the newest complete checkpoint (checked, and converted when
  written by another number of processes, by `resume.py`); an output folder holding another run (other
  flags, or files this project did not write) is refused; `--overwrite_output_dir` moves the old run
  into `previous-run-N/` (nothing deleted).
- A run killed in its final save finishes from its last-step checkpoint without training further.
- A full disk (or quota) while saving becomes `DiskFullError`, naming the path, the bytes needed
  and the last complete checkpoint, which is left intact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
from typing import Callable

import torch.distributed as dist
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .resume import RUN_SHAPE_FILE, UNIVERSAL_LATEST, prepare_resume, record_run_shape

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-checkpoint-"
PREVIOUS_RUN_PREFIX = "previous-run-"
RUN_ARGS_FILE = "run_args.json"
FINISHED_MARKER = TRAINER_STATE_NAME  # in the folder itself (not in a checkpoint): the run finished


def newest_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` (one with a trainer_state.json)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name[len(PREFIX_CHECKPOINT_DIR) + 1:].isdigit() and \
                os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            found.append((int(name.split("-")[1]), path))
    return max(found)[1] if found else None


# --- a full disk is named as such ------------------------------------------------------------------
class DiskFullError(OSError):
    """Not enough space to save; the message names the path, the bytes needed and the last good checkpoint."""


_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


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


# --- which run the folder holds -------------------------------------------------------------------
# Flags that may change between an interrupted run and its rerun.
_RERUN_FREE = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank", "report_to",
               "logging_dir", "run_name", "dataloader_num_workers", "disable_tqdm", "use_cpu", "deepspeed",
               "gradient_checkpointing_kwargs", "skip_bad_samples", "max_bad_sample_fraction", "skip_nan_steps",
               "ddp_timeout",
               # may change with the number of processes; resume.check_global_batch keeps the global batch
               "per_device_train_batch_size", "gradient_accumulation_steps"}

# In a checkpoint only to resume from it (optimizer, scheduler, RNG, DeepSpeed engine); not in a final model.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "latest", "zero_to_fp32.py", TRAINER_STATE_NAME,
                RUN_SHAPE_FILE, UNIVERSAL_LATEST)


def _run_signature(model_args, data_args, training_args) -> dict:
    args = {}
    for group in (model_args, data_args, training_args):
        for f in dataclasses.fields(group):
            if f.name not in _RERUN_FREE and not f.name.startswith("_"):
                value = getattr(group, f.name)
                args[f.name] = value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)
    return args


def _saved_at_last_step(checkpoint_dir: str) -> bool:
    """Whether the checkpoint is the run's last step (HF saves one there with --save_strategy steps)."""
    with open(os.path.join(checkpoint_dir, TRAINER_STATE_NAME)) as f:
        state = json.load(f)
    return 0 < state.get("max_steps", 0) <= state["global_step"]


class RunFolder:
    """The one owner of a run's output folder (`--output_dir`): its layout, checkpoints staged then
    published, the finished marker, where a rerun resumes, finishing from the last step."""

    def __init__(self, path: str):
        self.path = path

    # --- layout ------------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> str:
        return os.path.join(self.path, f"{PREFIX_CHECKPOINT_DIR}-{step}")

    def staging(self, step: int) -> str:
        """Where checkpoint-`step` is written before it is complete (the Trainer writes `<this>/checkpoint-N/`)."""
        return os.path.join(self.path, f"{STAGING_PREFIX}{step}")

    def staged_checkpoint(self, step: int) -> str:
        return os.path.join(self.staging(step), f"{PREFIX_CHECKPOINT_DIR}-{step}")

    def newest_checkpoint(self) -> str | None:
        return newest_checkpoint(self.path)

    def incomplete_checkpoints(self) -> list[str]:
        """Checkpoints whose write was cut short (a kill, a full disk): `tmp-checkpoint-*` folders."""
        if not os.path.isdir(self.path):
            return []
        return sorted(os.path.join(self.path, name) for name in os.listdir(self.path) if name.startswith(STAGING_PREFIX))

    # --- a checkpoint: staged, then published --------------------------------------------------------
    @contextlib.contextmanager
    def writing_checkpoint(self, step: int, bytes_needed: Callable[[], int], writer: bool):
        """Yields the folder to write checkpoint-`step` under (its staging folder). A full disk becomes
        `DiskFullError`; the `writer` process (rank 0) then removes the half-written checkpoint."""
        staging = self.staging(step)
        with explain_disk_full(staging, bytes_needed, self.newest_checkpoint(), partial=staging if writer else None):
            yield staging

    def record_run_shape(self, step: int, training_args) -> None:
        """How the staged checkpoint was trained, for resuming it on another number of processes."""
        record_run_shape(self.staged_checkpoint(step), training_args)

    def publish(self, step: int, state, save_total_limit: int | None) -> None:
        """Rename the complete staged checkpoint into place (one rename: atomic on one filesystem), then
        rotate old ones away (save_total_limit): rotation and resume only ever see complete checkpoints."""
        staged, final = self.staged_checkpoint(step), self.checkpoint(step)
        if state.best_model_checkpoint == staged:  # recorded while it was still in staging
            state.best_model_checkpoint = final
            state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        if os.path.exists(final):  # the same step saved twice: swap, so a complete copy exists at every moment
            replaced = os.path.join(self.path, STAGING_PREFIX + "replaced-" + os.path.basename(final))
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
            os.rename(staged, final)
            shutil.rmtree(replaced)
        else:
            os.rename(staged, final)
        shutil.rmtree(self.staging(step), ignore_errors=True)
        rotate_checkpoints(self.path, save_total_limit, state.best_model_checkpoint, use_mtime=True)

    # --- the finished run ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing_final_model(self, bytes_needed: Callable[[], int]):
        """Around the final save (model, then `mark_finished`): a full disk becomes `DiskFullError`."""
        with explain_disk_full(self.path, bytes_needed, self.newest_checkpoint()):
            yield self.path

    def mark_finished(self, state) -> None:
        """Written last: the folder then reads as a finished run (a rerun is refused, not resumed)."""
        state.save_to_json(os.path.join(self.path, FINISHED_MARKER))

    def is_finished(self) -> bool:
        return os.path.isfile(os.path.join(self.path, FINISHED_MARKER))

    def finish_if_saved_at_last_step(self, checkpoint: str | None, training_args) -> bool:
        """A run killed in its final save: write the final model from its last-step checkpoint (what the
        final save writes, the finished marker last) and say True. Resumed there, the HF Trainer would
        train one step past max_steps."""
        if not checkpoint or training_args.resume_from_checkpoint or not _saved_at_last_step(checkpoint):
            return False
        if training_args.process_index == 0:
            with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as f:
                best = json.load(f).get("best_model_checkpoint")
            use_best = training_args.load_best_model_at_end and best and os.path.isdir(best)
            source = best if use_best else checkpoint
            for name in sorted(os.listdir(source)):
                path = os.path.join(source, name)
                if os.path.isfile(path) and name not in _RESUME_ONLY and not name.startswith("rng_state"):
                    shutil.copy2(path, os.path.join(self.path, name))
            shutil.copy2(os.path.join(checkpoint, TRAINER_STATE_NAME), os.path.join(self.path, FINISHED_MARKER))
        logger.info("%s is the last step of this run: wrote the final model from it", checkpoint)
        return True

    # --- which run the folder holds, and where to resume ---------------------------------------------
    def prepare(self, model_args, data_args, training_args) -> str | None:
        """Check the folder, record this run's flags in it and return the checkpoint to resume from.

        Rank 0 sets aside an old run (--overwrite_output_dir) and removes incomplete checkpoints; every
        rank then sees the same folder. The checkpoint is checked (and converted, if written by another
        number of processes) by `resume.prepare_resume` before anything loads it.
        """
        resume = self._resume_point(model_args, data_args, training_args)
        if training_args.process_index == 0:
            if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
                self._set_aside_previous_run()
            for path in self.incomplete_checkpoints():  # left by a save that was killed
                logger.warning("removing %s: an incomplete checkpoint left by an interrupted save (resume ignores it)",
                               path)
                shutil.rmtree(path, ignore_errors=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if training_args.process_index == 0:
            os.makedirs(self.path, exist_ok=True)
            with open(os.path.join(self.path, RUN_ARGS_FILE), "w") as f:
                json.dump(_run_signature(model_args, data_args, training_args), f, indent=2)
        if resume and prepare_resume(resume, training_args):
            # DeepSpeed loads a universal checkpoint when the config its engine is built from (the Trainer's,
            # made from the flags) says so; the engine is built later, in trainer.train.
            training_args.hf_deepspeed_config.config.setdefault("checkpoint", {})["load_universal"] = True
        return resume

    def _resume_point(self, model_args, data_args, training_args) -> str | None:
        """Same run, interrupted: its newest complete checkpoint (LLaVA's behaviour). Another run, or files
        this project did not write: stop with the differences, unless --overwrite_output_dir."""
        out = self.path
        if training_args.resume_from_checkpoint:
            if not os.path.isfile(os.path.join(training_args.resume_from_checkpoint, TRAINER_STATE_NAME)):
                raise FileNotFoundError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: not a "
                                        "complete checkpoint (no trainer_state.json)")
            return training_args.resume_from_checkpoint
        existing = os.listdir(out) if os.path.isdir(out) else []
        if not existing or training_args.overwrite_output_dir:
            return None
        previous_file = os.path.join(out, RUN_ARGS_FILE)
        if not os.path.isfile(previous_file):
            raise FileExistsError(f"--output_dir {out} is not empty ({', '.join(sorted(existing)[:5])}) and was not "
                                  "written by a llava-tiny run; choose another folder or pass --overwrite_output_dir")
        with open(previous_file) as f:
            previous = json.load(f)
        signature = _run_signature(model_args, data_args, training_args)
        differences = {k: (previous.get(k), signature.get(k)) for k in sorted(set(previous) | set(signature))
                       if previous.get(k) != signature.get(k)}
        if differences:
            diff = "\n".join(f"  --{k}: {old!r} (in {out}) != {new!r} (now)" for k, (old, new) in differences.items())
            raise FileExistsError(f"--output_dir {out} holds a different run:\n{diff}\n"
                                  "use another --output_dir, or --overwrite_output_dir to start over there")
        if self.is_finished():
            raise FileExistsError(f"--output_dir {out} holds a finished run with these arguments; "
                                  "pass --overwrite_output_dir to train it again")
        checkpoint = self.newest_checkpoint()
        if checkpoint:
            logger.info("resuming the interrupted run from %s", checkpoint)
        return checkpoint

    def _set_aside_previous_run(self) -> None:
        """--overwrite_output_dir: move what the folder holds into `previous-run-N/` (nothing deleted), so
        the new run neither resumes from nor rotates away the old run's checkpoints."""
        if not os.path.isdir(self.path):
            return
        entries = [name for name in os.listdir(self.path) if not name.startswith(PREVIOUS_RUN_PREFIX)]
        if not entries:
            return
        taken = {name for name in os.listdir(self.path) if name.startswith(PREVIOUS_RUN_PREFIX)}
        number = 1
        while f"{PREVIOUS_RUN_PREFIX}{number}" in taken:
            number += 1
        target = os.path.join(self.path, f"{PREVIOUS_RUN_PREFIX}{number}")
        os.makedirs(target)
        for name in entries:
            os.rename(os.path.join(self.path, name), os.path.join(target, name))
        logger.warning("--overwrite_output_dir: moved what %s held into %s; the new run starts from scratch",
                       self.path, target)
