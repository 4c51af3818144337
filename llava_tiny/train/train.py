"""Train a LLaVA: projector pretraining, full, LoRA or QLoRA fine-tuning (LLaVA's flags).

    deepspeed llava_tiny/train/train_mem.py --deepspeed zero_configs/zero3.json \\
        --model_name_or_path ... --vision_tower ... --data_path ... --output_dir ...

`train_mem.py` is the same run asking for flash attention.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys

import torch
import torch.distributed as dist
from transformers import set_seed

from ..model.builder import assemble_model, load_projector_weights, resolve_dtype
from .arguments import parse_args
from .checkpoint import finish_from_last_step, saved_at_last_step
from .dataset import LazySupervisedDataset
from .fast_path import run_frozen_tower_without_grad
from .packing import make_data_collator, use_packed_attention
from .recipes import apply_recipe, recipe_name
from .safety import PreemptionCallback, explain_disk_full, remove_incomplete_checkpoints, set_aside_previous_run
from .trainer import LlavaTrainer, newest_checkpoint

logger = logging.getLogger("llava_tiny.train")

RUN_ARGS_FILE = "run_args.json"
# Flags that may change between an interrupted run and its rerun.
_RERUN_FREE = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank", "report_to",
               "logging_dir", "run_name", "dataloader_num_workers", "disable_tqdm", "use_cpu", "deepspeed",
               "gradient_checkpointing_kwargs", "skip_bad_samples", "max_bad_sample_fraction", "skip_nan_steps"}


def _run_signature(model_args, data_args, training_args) -> dict:
    args = {}
    for group in (model_args, data_args, training_args):
        for f in dataclasses.fields(group):
            if f.name not in _RERUN_FREE and not f.name.startswith("_"):
                value = getattr(group, f.name)
                args[f.name] = value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)
    return args


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def _attention(requested: str | None) -> str | None:
    """flash_attention_2 when asked for and usable; else SDPA, said once."""
    if requested != "flash_attention_2":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return requested
    logger.warning("flash-attn is not %s: using attn_implementation='sdpa'",
                   "installed" if torch.cuda.is_available() else "usable on a CPU")
    return "sdpa"


def _quantization(training_args, dtype):
    if training_args.bits not in (4, 8):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=training_args.bits == 4, load_in_8bit=training_args.bits == 8,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=training_args.double_quant,
                              bnb_4bit_quant_type=training_args.quant_type)


def _setup_logging(training_args) -> None:
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)


def train(attn_implementation: str | None = None, argv: list[str] | None = None) -> None:
    """Run one training job from LLaVA-style command-line flags."""
    model_args, data_args, training_args = parse_args(argv)
    _setup_logging(training_args)
    if training_args.disable_tqdm is None or not sys.stderr.isatty():
        training_args.disable_tqdm = not sys.stderr.isatty()  # plain log lines in a log file
    recipe = recipe_name(model_args, training_args)
    resume = resolve_resume(model_args, data_args, training_args)
    if training_args.process_index == 0:
        if training_args.overwrite_output_dir and not training_args.resume_from_checkpoint:
            set_aside_previous_run(training_args.output_dir)
        remove_incomplete_checkpoints(training_args.output_dir)  # left by a save that was killed
    _barrier()
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, RUN_ARGS_FILE), "w") as f:
            json.dump(_run_signature(model_args, data_args, training_args), f, indent=2)
    if resume and not training_args.resume_from_checkpoint and saved_at_last_step(resume):
        # The run was killed in its final save: its last checkpoint already is the final model.
        if training_args.process_index == 0:
            finish_from_last_step(resume, training_args.output_dir, training_args.load_best_model_at_end)
        logger.info("%s is the last step of this run: wrote the final model from it", resume)
        return

    set_seed(training_args.seed)  # the projector's initial weights depend on it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    requested = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    dtype = resolve_dtype(device, requested)
    strategy = "full" if model_args.mm_vision_select_feature == "cls_patch" else None
    if model_args.vision_tower is None:
        raise ValueError("--vision_tower is required (a CLIP or SigLIP vision model)")
    adapter = model_args.pretrain_mm_mlp_adapter
    if adapter and adapter.endswith((".bin", ".pt", ".pth")):  # LLaVA's released stage-1 projectors are pickles
        raise ValueError(f"--pretrain_mm_mlp_adapter {adapter}: pickled weights are never loaded here (unpickling can "
                         "run code, CVE-2025-32434); convert it first: python scripts/convert_bin_to_safetensors.py "
                         f"{adapter} CONVERTED_DIR, then pass CONVERTED_DIR")
    loaded = assemble_model(model_args.model_name_or_path, model_args.vision_tower,
                            mm_projector_type=model_args.mm_projector_type,
                            mm_vision_select_layer=model_args.mm_vision_select_layer, vision_select_strategy=strategy,
                            version=model_args.version, dtype=dtype, attn_implementation=_attention(attn_implementation),
                            quantization_config=_quantization(training_args, dtype),
                            trust_remote_code=model_args.trust_remote_code)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_weights(loaded.model, model_args.pretrain_mm_mlp_adapter)
        logger.info("projector initialised from %s", model_args.pretrain_mm_mlp_adapter)
    loaded.tokenizer.model_max_length = training_args.model_max_length
    model = apply_recipe(loaded.model, recipe, model_args, training_args)
    run_frozen_tower_without_grad(model)
    if training_args.packing:
        use_packed_attention(model)

    def dataset(path):
        return LazySupervisedDataset(
            path, loaded.tokenizer, loaded.image_processor, loaded.template, loaded.model.config.image_seq_length,
            image_folder=data_args.image_folder, image_aspect_ratio=data_args.image_aspect_ratio,
            model_max_length=training_args.model_max_length, skip_bad_samples=data_args.skip_bad_samples,
            allow_images_outside_folder=data_args.allow_images_outside_folder,
            max_bad_sample_fraction=data_args.max_bad_sample_fraction, report_dir=training_args.output_dir)

    if data_args.data_path is None:
        raise ValueError("--data_path is required (LLaVA JSON or JSONL)")
    trainer = LlavaTrainer(
        model=model, args=training_args, train_dataset=dataset(data_args.data_path),
        eval_dataset=dataset(data_args.eval_data_path) if data_args.eval_data_path else None,
        data_collator=make_data_collator(loaded.tokenizer.pad_token_id, training_args.packing),
        processing_class=loaded.processor, recipe=recipe)
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    with preemption.handling_signals():
        trainer.train(resume_from_checkpoint=resume)
    out = training_args.output_dir
    if preemption.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
        logger.warning("stopped by %s at step %d of %d: saved %s; rerun the same command to resume from it",
                       preemption.received, trainer.state.global_step, trainer.state.max_steps,
                       newest_checkpoint(out))
        return  # no final save: the folder must still read as an interrupted run
    with explain_disk_full(out, lambda: trainer.checkpoint_bytes_needed(include_optimizer=False),
                           newest_checkpoint(out)):
        trainer.save_model(out)
        trainer.save_state()  # last: trainer_state.json marks the run finished (resolve_resume)
    logger.info("saved the %s checkpoint to %s", recipe, out)


if __name__ == "__main__":
    train()

