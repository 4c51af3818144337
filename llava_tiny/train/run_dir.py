"""The output folder of a run: where checkpoints appear, which one a rerun resumes from, and what
a full disk, a killed save or a finished run leave there.

- Checkpoints appear only when complete: `checkpoint-N` is written as `tmp-checkpoint-N/checkpoint-N/`
  and renamed into place once weights, optimizer state and `trainer_state.json` are all on disk. A
  kill during the write leaves only the `tmp-` folder, which rotation (`save_total_limit`) and
  resume never see; the next run removes it.
- The same command, rerun, resumes from the newest complete checkpoint; an output folder holding
  another run (other flags, or files this project did not write) is refused;
  `--overwrite_output_dir` moves the old run into `previous-run-N/` (nothing deleted).
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

from .resume import RUN_SHAPE_FILE, UNIVERSAL_LATEST, prepare_resume

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-checkpoint-"
PREVIOUS_RUN_PREFIX = "previous-run-"
RUN_ARGS_FILE = "run_args.json"


def newest_checkpoint(output_dir: str) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` (one with a trainer_state.json)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit() and \
                os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(name.split("-")[1]), path))
    return max(found)[1] if found else None


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


# --- a run killed in its final save ----------------------------------------------------------------
# In a checkpoint only to resume from it (optimizer, scheduler, RNG, DeepSpeed engine); not in a final model.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "latest", "zero_to_fp32.py", "trainer_state.json",
                RUN_SHAPE_FILE, UNIVERSAL_LATEST)


def saved_at_last_step(checkpoint_dir: str) -> bool:
    """Whether the checkpoint is the run's last step (HF saves one there with --save_strategy steps)."""
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        state = json.load(f)
    return 0 < state.get("max_steps", 0) <= state["global_step"]


def finish_from_last_step(checkpoint_dir: str, output_dir: str, load_best_model_at_end: bool = False) -> None:
    """Write the final model folder from a last-step checkpoint: what the final save writes, with
    trainer_state.json last. (Resumed there, the HF Trainer would train one step past max_steps.)"""
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        best = json.load(f).get("best_model_checkpoint")
    source = best if load_best_model_at_end and best and os.path.isdir(best) else checkpoint_dir
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name not in _RESUME_ONLY and not name.startswith("rng_state"):
            shutil.copy2(path, os.path.join(output_dir, name))
    shutil.copy2(os.path.join(checkpoint_dir, "trainer_state.json"), os.path.join(output_dir, "trainer_state.json"))


# --- which run the folder holds, and where to resume ------------------------------------------------
# Flags that may change between an interrupted run and its rerun.
_RERUN_FREE = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank", "report_to",
               "logging_dir", "run_name", "dataloader_num_workers", "disable_tqdm", "use_cpu", "deepspeed",
               "gradient_checkpointing_kwargs", "skip_bad_samples", "max_bad_sample_fraction", "skip_nan_steps",
               "ddp_timeout",
               # may change with the number of processes; resume.check_global_batch keeps the global batch
               "per_device_train_batch_size", "gradient_accumulation_steps"}


def _run_signature(model_args, data_args, training_args) -> dict:
    args = {}
    for group in (model_args, data_args, training_args):
        for f in dataclasses.fields(group):
            if f.name not in _RERUN_FREE and not f.name.startswith("_"):
                value = getattr(group, f.name)
                args[f.name] = value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)
    return args


def resolve_resume(model_args, data_args, training_args) -> str | None:
    """Where to resume from, refusing to overwrite an output_dir that holds something else.

    Same run, interrupted: resume from its newest complete checkpoint (LLaVA's behaviour).
    Another run, or files this project did not write: stop with the differences, unless
    --overwrite_output_dir.
    """
    out = training_args.output_dir
    signature = _run_signature(model_args, data_args, training_args)
    if training_args.resume_from_checkpoint:
        if not os.path.isfile(os.path.join(training_args.resume_from_checkpoint, "trainer_state.json")):
            raise FileNotFoundError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: not a complete "
                                    "checkpoint (no trainer_state.json)")
        return training_args.resume_from_checkpoint
    existing = [f for f in os.listdir(out)] if os.path.isdir(out) else []
    if not existing or training_args.overwrite_output_dir:
        return None
    previous_file = os.path.join(out, RUN_ARGS_FILE)
    if not os.path.isfile(previous_file):
        raise FileExistsError(f"--output_dir {out} is not empty ({', '.join(sorted(existing)[:5])}) and was not written "
                              "by a llava-tiny run; choose another folder or pass --overwrite_output_dir")
    with open(previous_file) as f:
        previous = json.load(f)
    differences = {k: (previous.get(k), signature.get(k)) for k in sorted(set(previous) | set(signature))
                   if previous.get(k) != signature.get(k)}
    if differences:
        diff = "\n".join(f"  --{k}: {old!r} (in {out}) != {new!r} (now)" for k, (old, new) in differences.items())
        raise FileExistsError(f"--output_dir {out} holds a different run:\n{diff}\n"
                              "use another --output_dir, or --overwrite_output_dir to start over there")
    if os.path.isfile(os.path.join(out, "trainer_state.json")):
        raise FileExistsError(f"--output_dir {out} holds a finished run with these arguments; "
                              "pass --overwrite_output_dir to train it again")
    checkpoint = newest_checkpoint(out)
    if checkpoint:
        logger.info("resuming the interrupted run from %s", checkpoint)
    return checkpoint


def prepare_run_dir(model_args, data_args, training_args) -> str | None:
    """Check the output folder, record this run's flags in it and return the checkpoint to resume from.

    Rank 0 sets aside an old run (--overwrite_output_dir) and removes incomplete checkpoints; every
    rank then sees the same folder. The checkpoint is checked (and converted, if written by another
    number of processes) by `resume.prepare_resume` before anything loads it.
    """
    out = training_args.output_dir
    resume = resolve_resume(model_args, data_args, training_args)
    if training_args.process_index == 0:
        if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
            set_aside_previous_run(out)
        remove_incomplete_checkpoints(out)  # left by a save that was killed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if training_args.process_index == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, RUN_ARGS_FILE), "w") as f:
            json.dump(_run_signature(model_args, data_args, training_args), f, indent=2)
    if resume:
        prepare_resume(resume, training_args)
    return resume
