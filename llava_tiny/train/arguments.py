"""Command-line flags: LLaVA's names and meanings, plus a few of ours, in groups that each check themselves.

    ModelArguments           the starting point, tower, projector, template
    DataArguments            data files, images and how they are prepared
    LoraArguments            LoRA and QLoRA (part of both entry points' training flags)
    CommonTrainingArguments  HF's TrainingArguments and ours, for every entry point
    TrainingArguments        train.py: the common ones + --packing, --chunked_ce
    (train_dpo.DPOTrainingArguments: the common ones + DPO's; train.py's own flags are unknown there)

`parse_args` parses, then calls each group's `check(run)` once, before any model loads, and reports every
problem at once, each naming its flag; a flag the entry point does not have is one of them. The few checks that
need the loaded model are each group's `check_model`, run once by `check_flags_against_model`. It also names the
flags it accepts but does not use (LLaVA's own, and the tower/projector flags of a text-only run); what happens to
the command line before parsing is `command_line.py`.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import transformers

from ..anyres import anyres_flag_problems
from ..images import ASPECT_RATIOS, IMAGE_BACKGROUNDS
from .command_line import DDP_TIMEOUT, configure_reporting, on_gpu, prepare_argv

logger = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit types
LORA_BIASES = ("none", "all", "lora_only")  # peft's LoraConfig.bias


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Causal LM (hub id or local folder), e.g. TinyLlama."})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP or SigLIP vision model (hub id or folder)."})
    version: str | None = field(default=None, metadata={"help": "Chat template: plain, v1/vicuna_v1, llava_v1, tinyllama, llama_3, llava_llama_3, chatml, auto (the tokenizer's own). Default: the checkpoint's recorded template, else auto when the tokenizer has a usable chat template, else llava_v1."})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear, mlp{N}x_gelu, identity, or a registered projector."})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "Vision tower layer whose features are used."})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (drop CLIP's CLS) or cls_patch (keep it)."})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "Stage-1 projector to start from (folder or mm_projector.safetensors)."})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Stage 1: train only the projector."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the language model."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": "Train the vision tower too (LR: --mm_vision_tower_lr)."})
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "LLaVA-1.0 <im_start>/<im_end> tokens (not supported: keep False)."})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "LLaVA-1.0 patch tokens (not supported: keep False)."})
    mm_patch_merge_type: str = field(default="flat", metadata={"help": "flat (LLaVA-1.5), or spatial_unpad with --image_aspect_ratio anyres (LLaVA-NeXT)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run code shipped with a model (off unless you pass it)."})

    def check(self, run: RunArguments) -> list[str]:
        """Problems with the model flags, and with the starting point they name (read from its config, no weights)."""
        from ..model.projector import projector_type
        from ..model.vision import select_strategy_for_feature
        from ..templates import template_name_problems
        from .starting_point import starting_point_problems

        problems = template_name_problems("--version", self.version)
        adapter = self.pretrain_mm_mlp_adapter
        if adapter and adapter.endswith(PICKLE_SUFFIXES):  # LLaVA's released stage-1 projectors are pickles
            problems.append(f"--pretrain_mm_mlp_adapter {adapter}: pickled weights are never loaded here (unpickling "
                            "can run code, CVE-2025-32434); convert it first: python scripts/convert_bin_to_safetensors.py "
                            f"{adapter} CONVERTED_DIR, then pass CONVERTED_DIR")
        elif adapter and not os.path.exists(adapter):
            problems.append(f"--pretrain_mm_mlp_adapter {adapter}: no such file or folder")
        # The registries of projectors and select strategies say what they accept.
        for flag, value, known in (("--mm_projector_type", self.mm_projector_type, projector_type),
                                   ("--mm_vision_select_feature", self.mm_vision_select_feature,
                                    select_strategy_for_feature)):
            try:
                known(value)
            except ValueError as err:
                problems.append(f"{flag}: {err}")
        if self.mm_use_im_start_end or self.mm_use_im_patch_token:
            problems.append("--mm_use_im_start_end / --mm_use_im_patch_token are LLaVA-1.0 options that LLaVA-1.5 "
                            "recipes set to False; this project supports only False")
        if self.tune_mm_mlp_adapter and run.training.lora_enable:
            problems.append("--tune_mm_mlp_adapter (stage 1) trains only the projector; do not combine it with "
                            "--lora_enable")
        if self.tune_mm_mlp_adapter and run.training.freeze_mm_mlp_adapter:
            problems.append("--tune_mm_mlp_adapter with --freeze_mm_mlp_adapter: nothing would train")
        return problems + starting_point_problems(self, run.training)


TRAINING_ASPECT_RATIOS = (*ASPECT_RATIOS, "anyres")  # anyres: the model becomes LLaVA-NeXT (tiles), see anyres.py


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON/JSONL training data."})
    eval_data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON/JSONL for eval loss."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the 'image' paths are relative to."})
    image_aspect_ratio: str = field(default="pad", metadata={"help": f"{', '.join(TRAINING_ASPECT_RATIOS)}: pad (to square, mean colour), square, resize, or anyres (LLaVA-NeXT tiles; with --image_grid_pinpoints and --mm_patch_merge_type spatial_unpad)."})
    image_grid_pinpoints: str | None = field(default=None, metadata={"help": "anyres resolutions: [[336,672],[672,336],...] ([height, width] pairs) or a range like (1x1),...,(3x3)."})
    image_background: str = field(default="white", metadata={"help": f"What transparent pixels become: {' or '.join(IMAGE_BACKGROUNDS)} (the image processor's mean colour)."})
    lazy_preprocess: bool = field(default=True, metadata={"help": "No effect: samples are always tokenized and loaded per step."})
    is_multimodal: bool = field(default=True, metadata={"help": "No effect: accepted for LLaVA compatibility."})
    skip_bad_samples: bool = field(default=False, metadata={"help": "Skip missing/corrupt images and unfit samples (listed in output_dir) instead of stopping."})
    allow_images_outside_folder: bool = field(default=False, metadata={"help": "Allow image paths with ../ or absolute paths."})
    max_bad_sample_fraction: float = field(default=0.01, metadata={"help": "With --skip_bad_samples, stop when more than this fraction is bad."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "Where the check before training is remembered (a warm start skips it): default .llava_tiny_cache/ beside the data, else ~/.cache/llava_tiny; 'none' turns it off."})

    def check(self, run: RunArguments) -> list[str]:
        """Problems with the data and image flags (the files and folder they name must exist)."""
        problems = []
        if self.data_path is None:
            problems.append("--data_path is required (LLaVA JSON or JSONL)")
        for flag, path in (("--data_path", self.data_path), ("--eval_data_path", self.eval_data_path)):
            if path is not None and not os.path.isfile(path):
                problems.append(f"{flag} {path}: no such file; expected a LLaVA JSON or JSONL data file")
        if self.image_folder is not None and not os.path.isdir(self.image_folder):
            problems.append(f"--image_folder {self.image_folder}: no such folder")
        for flag, value, allowed in (("--image_aspect_ratio", self.image_aspect_ratio, TRAINING_ASPECT_RATIOS),
                                     ("--image_background", self.image_background, IMAGE_BACKGROUNDS)):
            if value not in allowed:
                problems.append(f"{flag} {value!r}: expected one of {', '.join(allowed)}")
        if not 0 <= self.max_bad_sample_fraction <= 1:
            problems.append(f"--max_bad_sample_fraction {self.max_bad_sample_fraction}: expected a fraction "
                            "between 0 and 1")
        return problems + anyres_flag_problems(self.image_aspect_ratio, self.image_grid_pinpoints,
                                               run.model.mm_patch_merge_type)


@dataclass
class LoraArguments:
    """LoRA and QLoRA: the adapters and the quantized language model they train on (train.py and train_dpo.py)."""

    bits: int = field(default=16, metadata={"help": "4 or 8: quantize the LLM (QLoRA); 16: no quantization."})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA double quantization."})
    quant_type: str = field(default="nf4", metadata={"help": f"QLoRA 4-bit type: {' or '.join(QUANT_TYPES)}."})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = field(default="none", metadata={"help": f"Which biases train with the adapters: {', '.join(LORA_BIASES)}."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA targets: all-linear (every linear layer of the language model but lm_head) or a comma list of module names, e.g. q_proj,v_proj."})
    lora_weight_path: str = field(default="", metadata={"help": "No effect: accepted for LLaVA compatibility."})

    def check(self, run: RunArguments) -> list[str]:
        problems = []
        if self.bits not in (4, 8, 16):
            problems.append(f"--bits {self.bits}: expected 4, 8 or 16")
        elif self.bits in (4, 8) and not self.lora_enable:
            problems.append(f"--bits {self.bits} quantizes the LLM, which can then only be trained with "
                            "--lora_enable True")
        if self.quant_type not in QUANT_TYPES:
            problems.append(f"--quant_type {self.quant_type!r}: expected one of {', '.join(QUANT_TYPES)}")
        if self.lora_bias not in LORA_BIASES:
            problems.append(f"--lora_bias {self.lora_bias!r}: expected one of {', '.join(LORA_BIASES)}")
        if self.lora_r < 1:
            problems.append(f"--lora_r {self.lora_r}: expected a rank of at least 1")
        return problems

    def check_model(self, model) -> list[str]:
        """--lora_target_modules against the loaded model's layer names (no config file lists them)."""
        from ..model.lora import lora_target_names

        if not self.lora_enable:
            return []
        try:
            lora_target_names(model, self.lora_target_modules)
        except ValueError as err:
            return [str(err)]
        return []


@dataclass
class CommonTrainingArguments(LoraArguments, transformers.TrainingArguments):
    """HF's flags, LLaVA's and ours that every training entry point (train.py, train_dpo.py) uses."""

    model_max_length: int = field(default=2048, metadata={"help": "Sequences are truncated by whole turns to this."})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Keep the projector frozen."})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Projector learning rate (own parameter group)."})
    mm_vision_tower_lr: float | None = field(default=None, metadata={"help": "Vision tower learning rate when unfrozen."})
    group_by_modality_length: bool = field(default=False, metadata={"help": "Batches of image-only or text-only samples, grouped by length."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached (every from_pretrained)."})
    mpt_attn_impl: str | None = field(default=None, metadata={"help": "No effect: LLaVA's MPT option."})
    remove_unused_columns: bool = False
    optim: str = "adamw_torch"
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over in an output_dir that holds another run."})
    skip_nan_steps: bool = field(default=False, metadata={"help": "On a NaN/inf loss, skip the step and count it instead of stopping."})
    ddp_timeout: int = field(default=DDP_TIMEOUT, metadata={"help": "Seconds a collective may wait for the other processes before the job stops with every rank's stack (HF's default is 1800)."})

    # The entry point these flags belong to, as an unknown flag's message names it.
    used_by: ClassVar[str] = "this entry point"

    def check(self, run: RunArguments) -> list[str]:
        problems = []
        if self.skip_nan_steps and self.deepspeed:
            problems.append("--skip_nan_steps cannot be used with --deepspeed: DeepSpeed applies the update inside "
                            "backward, so a step cannot be dropped after its loss is seen. Without it, the run stops "
                            "at a NaN/inf loss with the step, the sample ids and the last good checkpoint")
        return problems + LoraArguments.check(self, run)

    def check_model(self, model) -> list[str]:
        """Problems that only the loaded model shows (see `check_flags_against_model`)."""
        return LoraArguments.check_model(self, model)


@dataclass
class TrainingArguments(CommonTrainingArguments):
    """train.py's flags: the common ones, and supervised batching and loss (--packing, --chunked_ce)."""

    packing: bool = field(default=False, metadata={"help": "Padding-free batches: each batch packed into one row, attention kept within each sample, logits only for supervised tokens (sdpa or flash_attention_2)."})
    chunked_ce: bool = field(default=False, metadata={"help": "Compute the loss from hidden states in chunks: no full-vocabulary logits for every position at once."})

    used_by: ClassVar[str] = "train.py"

    def check(self, run: RunArguments) -> list[str]:
        problems = super().check(run)
        if self.chunked_ce and transformers.integrations.is_deepspeed_zero3_enabled():
            # Recomputing a chunk re-runs lm_head in backward, where ZeRO-3 hands a frozen lm_head's
            # partitioned (empty) weight: torch.utils.checkpoint then fails on the mismatch.
            problems.append("--chunked_ce cannot run under ZeRO-3; use ZeRO-2, or drop --chunked_ce (with --packing "
                            "logits are computed only for supervised tokens)")
        return problems

    def check_model(self, model) -> list[str]:
        """Also --packing against the attention implementation the model loaded with (transformers picks it
        at load time, from what the model and the machine support)."""
        from .packing import packed_attention_problem

        problems = super().check_model(model)
        if self.packing and (problem := packed_attention_problem(model)):
            problems.append(problem)
        return problems


class RunArguments(NamedTuple):
    """The parsed flags of one run (unpacks as `model_args, data_args, training_args`); each group checks itself
    with `check(run)` (it may read the other groups where a rule spans them)."""

    model: ModelArguments
    data: DataArguments
    training: CommonTrainingArguments


# LLaVA flags accepted so that users' scripts run, with no effect here (named once at start).
NO_EFFECT_FLAGS = ("--lazy_preprocess", "--is_multimodal", "--lora_weight_path", "--mpt_attn_impl")
# Flags for the tower, the projector and images: named the same way in a text-only run, which has none of them.
VISION_ONLY_FLAGS = ("--mm_projector_lr", "--mm_vision_tower_lr", "--mm_projector_type", "--mm_vision_select_layer",
                     "--mm_vision_select_feature", "--freeze_mm_mlp_adapter", "--unfreeze_mm_vision_tower",
                     "--image_aspect_ratio", "--image_background", "--image_folder", "--image_grid_pinpoints")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class FlagError(ValueError):
    """Flags that cannot run together or point at nothing; the message lists every problem by flag."""


def raise_flag_problems(problems: list[str]) -> None:
    """`FlagError` listing every problem, one line each; nothing when there is none."""
    if problems:
        raise FlagError("invalid flags:\n" + "\n".join(f"  {p}" for p in problems))


def check_flags_against_model(training_args: CommonTrainingArguments, model) -> None:
    """The only flag checks made after a model loads, because only the loaded model can answer them: which layers
    --lora_target_modules names, and which attention implementation --packing would run with. Called once, right
    after the starting point loads and before the recipe changes it."""
    raise_flag_problems(training_args.check_model(model))


def _name_flags_without_effect(argv: list[str], model_args, training_args) -> None:
    """One warning line for each reason a flag given has no effect (LLaVA compatibility, a text-only run)."""
    from .starting_point import is_text_only

    given = {a.split("=")[0] for a in argv}
    unused = [flag for flag in NO_EFFECT_FLAGS if flag in given]
    if unused:
        logger.warning("accepted for compatibility, no effect here: %s", ", ".join(unused))
    vision = [flag for flag in VISION_ONLY_FLAGS if flag in given]
    if vision and is_text_only(model_args, training_args):
        logger.warning("no effect in a text-only run (no vision tower, no projector): %s", ", ".join(vision))


def _unknown_flag_problems(remaining: list[str], used_by: str) -> list[str]:
    """What HfArgumentParser did not take: each unknown flag by name (its value goes with it), else the strays."""
    unknown = [arg.split("=")[0] for arg in remaining if arg.startswith("-")]
    if unknown:
        return [f"{flag} is not used by {used_by}: unknown flag (--help lists the flags)" for flag in unknown]
    return [f"{arg!r}: not a flag (flags start with --)" for arg in remaining]


def parse_args(argv: list[str] | None = None, training_class: type[CommonTrainingArguments] | None = None
               ) -> RunArguments:
    """Parse LLaVA-style flags into (model, data, training) arguments, each group checked by its `check` before
    any model loads; `FlagError` lists every problem, unknown flags included.

    `training_class`: the entry point's training flags, `TrainingArguments` (train.py) or DPO's."""
    training_class = training_class or TrainingArguments
    argv = prepare_argv(list(sys.argv[1:] if argv is None else argv))
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, training_class))
    *groups, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    run = RunArguments(*groups)
    # An empty value is a flag not given: the scripts pass "$VISION_TOWER", and VISION_TOWER="" is a text-only run.
    run.model.vision_tower = run.model.vision_tower or None
    run.data.image_folder = run.data.image_folder or None
    raise_flag_problems(_unknown_flag_problems(remaining, training_class.used_by)
                        + [problem for group in run for problem in group.check(run)])
    training_args = run.training
    _name_flags_without_effect(argv, run.model, training_args)
    if not on_gpu():
        training_args.dataloader_pin_memory = False
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    configure_reporting(training_args)
    return run
