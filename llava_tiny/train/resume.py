"""Resuming a checkpoint: safely, and exactly or not at all (asked by `run_dir.RunFolder`, which owns
the run folder).

- DeepSpeed's own `global_step*/*.pt` files are pickles that DeepSpeed loads with
  `weights_only=False`: a checkpoint someone altered could run code. Before anything loads them, each
  is read with `torch.load(weights_only=True)` and the few DeepSpeed classes its states hold
  (`check_deepspeed_pickles`); one that needs anything else stops the run, naming the file.
- A checkpoint written by another number of processes (a job requeued on fewer GPUs) resumes through
  DeepSpeed's universal checkpoint: `ds_to_universal` is run for the user (logged) and the engine loads
  it. The global batch (processes x per-device batch x accumulation) must stay what it was, so that
  the data position and the schedule mean the same; if not, the run stops and says which flag to pass.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import subprocess
import sys

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

RUN_SHAPE_FILE = "run_shape.json"  # how a checkpoint was trained: written with it, read before resuming it
UNIVERSAL_LATEST = "latest_universal"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed exactly; the message says what to do."""


def _deepspeed_safe_globals() -> list:
    """What DeepSpeed's ZeRO-1/2/3 optimizer states pickle besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def deepspeed_pickles(checkpoint: str) -> list[str]:
    """DeepSpeed's pickled files in a checkpoint (engine states, and a universal conversion's)."""
    return sorted(glob.glob(os.path.join(checkpoint, "global_step*", "**", "*.pt"), recursive=True))


def check_deepspeed_pickles(checkpoint: str) -> None:
    """Raise `pickle.UnpicklingError` naming the first of the checkpoint's DeepSpeed pickles that holds
    more than tensors, plain containers and DeepSpeed's own state classes; nothing in it is run.

    With several processes, each reads its share of the files and all learn the verdict."""
    files = deepspeed_pickles(checkpoint)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    problems = []
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for path in files[rank::world]:
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
                problems.append(f"{path}: {reason}")
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
    if problems:
        raise pickle.UnpicklingError(
            f"refusing to resume from {checkpoint}: {problems[0]}. This DeepSpeed file holds objects other than "
            "tensors and DeepSpeed's optimizer state, so loading it could run code; it was not loaded. Resume from "
            "a checkpoint you wrote yourself, or check where this one came from"
            + (f" ({len(problems) - 1} more file(s) alike)" if len(problems) > 1 else ""))


def record_run_shape(checkpoint: str, training_args) -> None:
    """Write into `checkpoint` how it is being trained (read back by `written_shape`)."""
    shape = {"world_size": training_args.world_size,
             "per_device_train_batch_size": training_args.per_device_train_batch_size,
             "gradient_accumulation_steps": training_args.gradient_accumulation_steps}
    with open(os.path.join(checkpoint, RUN_SHAPE_FILE), "w") as f:
        json.dump(shape, f, indent=2)


def written_shape(checkpoint: str) -> dict:
    """How the checkpoint was trained: world_size, per_device_train_batch_size, gradient_accumulation_steps
    (from run_shape.json; else the world size alone, counted from the per-rank files)."""
    path = os.path.join(checkpoint, RUN_SHAPE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    engine = sorted(glob.glob(os.path.join(checkpoint, "global_step*")))
    if engine:
        shards = glob.glob(os.path.join(engine[0], "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
        return {"world_size": len(shards)} if shards else {}
    ranks = glob.glob(os.path.join(checkpoint, "rng_state_*.pth"))
    return {"world_size": len(ranks) or 1} if os.path.isfile(os.path.join(checkpoint, "trainer_state.json")) else {}


def check_global_batch(checkpoint: str, training_args) -> None:
    """Stop, saying which flag keeps it, when the global batch differs from the checkpoint's."""
    shape = written_shape(checkpoint)
    if "per_device_train_batch_size" not in shape:
        return
    before = shape["world_size"] * shape["per_device_train_batch_size"] * shape["gradient_accumulation_steps"]
    per_step = training_args.world_size * training_args.per_device_train_batch_size
    now = per_step * training_args.gradient_accumulation_steps
    if now == before:
        return
    fix = (f"pass --gradient_accumulation_steps {before // per_step}" if before % per_step == 0 else
           f"choose --per_device_train_batch_size and --gradient_accumulation_steps whose product with "
           f"{training_args.world_size} process(es) is {before}")
    raise ResumeError(
        f"{checkpoint} was trained with a global batch of {before} ({shape['world_size']} process(es) x "
        f"{shape['per_device_train_batch_size']} per device x {shape['gradient_accumulation_steps']} accumulation "
        f"steps); this run's is {now} ({training_args.world_size} x {training_args.per_device_train_batch_size} x "
        f"{training_args.gradient_accumulation_steps}), so the data position and the schedule would not continue "
        f"exactly. To resume it on {training_args.world_size} process(es), {fix}")


def _convert_to_universal(checkpoint: str) -> str:
    """Run DeepSpeed's own ds_to_universal on the checkpoint's engine folder (next to it, kept)."""
    engine = sorted(glob.glob(os.path.join(checkpoint, "global_step*")))
    engine = [e for e in engine if not e.endswith("_universal")]
    if len(engine) != 1:
        raise ResumeError(f"{checkpoint}: expected one DeepSpeed global_step* folder, found {engine}")
    target = engine[0] + "_universal"
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", engine[0],
               "--output_folder", target, "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
    logger.warning("converting %s to DeepSpeed's universal checkpoint format (written by another number of "
                   "processes): %s", engine[0], " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not os.path.isfile(os.path.join(checkpoint, UNIVERSAL_LATEST)):
        raise ResumeError(
            f"{checkpoint} was written by another number of processes and DeepSpeed's universal conversion failed "
            f"(exit {result.returncode}):\n{result.stderr[-2000:]}\nResume it on the number of processes that wrote "
            f"it (see {os.path.join(checkpoint, RUN_SHAPE_FILE)}), or start a new run from its weights "
            f"(--model_name_or_path {checkpoint}) with another --output_dir")
    logger.warning("universal checkpoint written to %s", target)
    return target


def prepare_resume(checkpoint: str, training_args) -> bool:
    """Before resuming `checkpoint`: its pickles checked, its global batch compared and, when it was
    written by another number of DeepSpeed processes, converted to DeepSpeed's universal checkpoint.
    Every rank calls this; True: this run's engine is to load the universal checkpoint."""
    distributed = dist.is_available() and dist.is_initialized()
    check_deepspeed_pickles(checkpoint)  # before the conversion: it unpickles them fully
    check_global_batch(checkpoint, training_args)
    written = written_shape(checkpoint).get("world_size")
    if not training_args.deepspeed or not written or written == training_args.world_size:
        return False
    failure = None
    if training_args.process_index == 0:
        universal = os.path.join(checkpoint, UNIVERSAL_LATEST)
        if os.path.isfile(universal):
            with open(universal) as f:
                logger.warning("%s was written by %d process(es), resumed on %d: loading its universal checkpoint "
                               "%s (converted before)", checkpoint, written, training_args.world_size, f.read().strip())
        else:
            try:
                _convert_to_universal(checkpoint)
            except ResumeError as err:
                failure = str(err)
    if distributed:  # every rank waits for rank 0's conversion (bounded by --ddp_timeout) and its verdict
        verdict = [failure]
        dist.broadcast_object_list(verdict, src=0)
        failure = verdict[0]
    if failure:
        raise ResumeError(failure)
    if not os.path.isfile(os.path.join(checkpoint, UNIVERSAL_LATEST)):
        raise ResumeError(f"{checkpoint}: the universal conversion is not visible from rank "
                          f"{training_args.process_index}; resume from a folder every node can read")
    return True
