"""Train a LLaVA: projector pretraining, full, LoRA or QLoRA fine-tuning (LLaVA's flags).

    deepspeed llava_tiny/train/train_mem.py --deepspeed zero_configs/zero3.json \\
        --model_name_or_path ... --vision_tower ... --data_path ... --output_dir ...
    python llava_tiny/train/train.py --model_name_or_path ... (one process, no DeepSpeed)

`train_mem.py` is the same run asking for flash attention. `build_trainer` and `run` are the two
steps of `train()`; benchmarks and tests call them to measure or inspect a real run.
"""
from __future__ import annotations

import faulthandler
import importlib.util
import logging
import os
import sys

if __package__ in (None, ""):  # `python llava_tiny/train/train.py`: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from llava_tiny.anyres import AnyresTiling  # noqa: E402
from llava_tiny.model import image_seq_length, unwrap_model  # noqa: E402
from llava_tiny.model.anyres_model import with_anyres  # noqa: E402
from llava_tiny.model.builder import resolve_dtype  # noqa: E402
from llava_tiny.model.checkpoints import load_projector_weights  # noqa: E402
from llava_tiny.model.modeling_next import is_next  # noqa: E402
from llava_tiny.train.arguments import FlagError, RunArguments, check_flags_against_model, parse_args  # noqa: E402
from llava_tiny.train.callbacks import PreemptionCallback  # noqa: E402
from llava_tiny.train.dataset import LazySupervisedDataset  # noqa: E402
from llava_tiny.train.distributed import (PeerWatchdog, StepWatchdog, end_process_group,  # noqa: E402
                                          release_shared_memory_names)
from llava_tiny.train.fast_path import run_frozen_tower_without_grad  # noqa: E402
from llava_tiny.train.packing import make_data_collator, use_packed_attention  # noqa: E402
from llava_tiny.train.recipes import make_recipe  # noqa: E402
from llava_tiny.train.run_dir import RunFolder  # noqa: E402
from llava_tiny.train.starting_point import load_starting_point  # noqa: E402
from llava_tiny.train.trainer import LlavaTrainer  # noqa: E402

logger = logging.getLogger("llava_tiny.train")


def train(attn_implementation: str | None = None, argv: list[str] | None = None, training_class=None,
          build=None) -> None:
    """Run one training job from LLaVA-style command-line flags (`train_dpo.py` passes its flags and trainer)."""
    args = parse_args(argv, training_class)  # every flag problem at once, before any model loads
    _setup_logging(args.training)
    release_shared_memory_names()  # DeepSpeed on CPUs: its all-reduce buffers, once every rank has mapped them
    _train(args, attn_implementation, build)
    end_process_group()  # not on an error: a rank that died or hangs would keep the others waiting here


def _train(args: RunArguments, attn_implementation: str | None, build) -> None:
    folder = RunFolder(args.training.output_dir)
    resume = folder.prepare(*args)  # the same command resumes an interrupted run
    if folder.finish_if_saved_at_last_step(resume, args.training):  # killed in its final save
        return
    trainer = (build or build_trainer)(args, attn_implementation)
    run(trainer, resume)


def build_trainer(args: RunArguments, attn_implementation: str | None = None) -> LlavaTrainer:
    """The model (with the recipe applied), the datasets and the trainer for parsed `args`."""
    training_args = args.training
    loaded, model, recipe = load_model_for_training(args, attn_implementation)
    if training_args.packing:
        use_packed_attention(model)
    train_dataset, eval_dataset = make_datasets(loaded, args)
    return LlavaTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=make_data_collator(loaded.tokenizer.pad_token_id, training_args.packing),
        processing_class=loaded.processor, recipe=recipe)


def make_datasets(loaded, args: RunArguments, dataset_class=LazySupervisedDataset):
    """The training and eval (None without --eval_data_path) datasets of `dataset_class` for `args`."""
    _, data_args, training_args = args
    config = unwrap_model(loaded.model).config
    # An anyres model: each <image> takes its own image's count, tiled under the model's pinpoints.
    anyres = AnyresTiling.for_tower(config.image_grid_pinpoints, loaded.image_processor,
                                    config.vision_config.patch_size) if is_next(loaded.model) else None

    def dataset(path):
        return dataset_class(
            path, loaded.tokenizer, loaded.image_processor, loaded.template, image_seq_length(loaded.model),
            image_folder=data_args.image_folder, image_aspect_ratio=data_args.image_aspect_ratio,
            image_background=data_args.image_background, model_max_length=training_args.model_max_length,
            skip_bad_samples=data_args.skip_bad_samples, allow_images_outside_folder=data_args.allow_images_outside_folder,
            max_bad_sample_fraction=data_args.max_bad_sample_fraction, report_dir=training_args.output_dir,
            data_cache_dir=data_args.data_cache_dir, anyres=anyres)

    return dataset(data_args.data_path), dataset(data_args.eval_data_path) if data_args.eval_data_path else None


def load_model_for_training(args: RunArguments, attn_implementation: str | None = None):
    """The starting point, loaded and prepared by its recipe: (the `LoadedModel`, the model to train, the recipe)."""
    model_args, data_args, training_args = args
    recipe = make_recipe(model_args, training_args)
    set_seed(training_args.seed)  # the projector's initial weights depend on it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    requested = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    dtype = resolve_dtype(device, requested)
    loaded = load_starting_point(model_args, training_args, dtype, recipe.quantization_config(dtype),
                                 _attention(attn_implementation))
    check_flags_against_model(training_args, loaded.model)  # before the recipe changes the model
    if getattr(loaded.model.config, "vision_config", None) is not None:  # saved: how this model sees images
        loaded = _anyres_or_not(loaded, data_args)
        loaded.model.config.image_aspect_ratio = data_args.image_aspect_ratio
        loaded.model.config.image_background = data_args.image_background
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_weights(loaded.model, model_args.pretrain_mm_mlp_adapter)
        logger.info("projector initialised from %s", model_args.pretrain_mm_mlp_adapter)
    model = recipe.prepare(loaded.model)
    run_frozen_tower_without_grad(model)
    return loaded, model, recipe


def _anyres_or_not(loaded, data_args):
    """With --image_aspect_ratio anyres, the model as LLaVA-NeXT (a LLaVA-1.5 one converted); a NeXT starting point
    reads tiles only."""
    if data_args.image_aspect_ratio == "anyres":
        return with_anyres(loaded, data_args.image_grid_pinpoints)
    if is_next(loaded.model):
        raise FlagError(f"--model_name_or_path is a LLaVA-NeXT (anyres) model, which reads images as tiles: pass "
                        f"--image_aspect_ratio anyres --mm_patch_merge_type spatial_unpad --image_grid_pinpoints "
                        f"(its own: {loaded.model.config.image_grid_pinpoints}), not {data_args.image_aspect_ratio}")
    return loaded


def run(trainer: LlavaTrainer, resume_from_checkpoint: str | None = None) -> None:
    """Train (stopping cleanly on a preemption signal), then write the final checkpoint."""
    folder = trainer.run_folder
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    steps = StepWatchdog(trainer.args.ddp_timeout, trainer.args.process_index)  # hangs, slow steps
    trainer.add_callback(steps)
    faulthandler.enable()  # a crash in native code still prints the Python stack
    with preemption.handling_signals(), steps, PeerWatchdog(folder.newest_checkpoint) as peers:
        try:
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        except Exception as err:
            peers.raise_if_a_peer_died(err)  # name the rank that died rather than the failed collective
            raise
    if preemption.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        logger.warning("stopped by %s at step %d of %d: saved %s; rerun the same command to resume from it",
                       preemption.received, trainer.state.global_step, trainer.state.max_steps,
                       folder.newest_checkpoint())
        if trainer.args.world_size > 1:  # every rank says so: the launcher does not report their exit codes
            logger.warning("rank %d: stopped at step %d with the checkpoint saved; exiting 0",
                           trainer.args.process_index, trainer.state.global_step)
        return  # no final save: the folder must still read as an interrupted run
    with folder.writing_final_model(lambda: trainer.checkpoint_bytes_needed(include_optimizer=False)) as out:
        trainer.save_model(out)
        if trainer.is_world_process_zero():
            folder.mark_finished(trainer.state)  # last: the folder now reads as a finished run
    logger.info("saved the %s checkpoint to %s", trainer.recipe.name, out)


def _attention(requested: str | None) -> str | None:
    """flash_attention_2 when asked for and usable; else SDPA, said once."""
    if requested != "flash_attention_2":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return requested
    logger.warning("flash-attn is not %s: using attn_implementation='sdpa'",
                   "installed" if torch.cuda.is_available() else "usable on a CPU")
    return "sdpa"


def _setup_logging(training_args) -> None:
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    if training_args.disable_tqdm is None or not sys.stderr.isatty():
        training_args.disable_tqdm = not sys.stderr.isatty()  # plain log lines in a log file


if __name__ == "__main__":
    train()
