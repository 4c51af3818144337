"""Command-line flags: LLaVA's names and meanings, plus a few of ours.

`parse_args` parses and checks every flag before any model loads, and reports every problem at
once, each naming its flag. It also turns the GPU-only flags users copy from GPU scripts (`--bf16`,
`--tf32`) into what works on the machine at hand, with one log line each, instead of a crash, and
names the flags it accepts but does not use (LLaVA's own, and the tower/projector flags of a text-only run).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import torch
import transformers

logger = logging.getLogger(__name__)

# Well under HF's 30 minutes: a hung or dead rank ends the job in 10 minutes, not 30 (raise it for saves or
# evaluations that keep the other ranks waiting longer).
DDP_TIMEOUT = 600


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Causal LM (hub id or local folder), e.g. TinyLlama."})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP or SigLIP vision model (hub id or folder)."})
    version: str | None = field(default=None, metadata={"help": "Chat template: plain, v1/vicuna_v1, llava_v1, tinyllama, llama_3, llava_llama_3, chatml, auto (the tokenizer's own). Default: the checkpoint's recorded template, else auto when the tokenizer has a usable chat template, else llava_v1."})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear, mlp{N}x_gelu or identity."})
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


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON/JSONL training data."})
    eval_data_path: str | None = field(default=None, metadata={"help": "LLaVA JSON/JSONL for eval loss."})
    image_folder: str | None = field(default=None, metadata={"help": "Folder the 'image' paths are relative to."})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad (to square, mean colour), square, resize, or anyres (LLaVA-NeXT tiles; with --image_grid_pinpoints and --mm_patch_merge_type spatial_unpad)."})
    image_grid_pinpoints: str | None = field(default=None, metadata={"help": "anyres resolutions: [[336,672],[672,336],...] ([height, width] pairs) or a range like (1x1),...,(3x3)."})
    image_background: str = field(default="white", metadata={"help": "What transparent pixels become: white, or mean (the image processor's mean colour).", "choices": ["white", "mean"]})
    lazy_preprocess: bool = field(default=True, metadata={"help": "No effect: samples are always tokenized and loaded per step."})
    is_multimodal: bool = field(default=True, metadata={"help": "No effect: accepted for LLaVA compatibility."})
    skip_bad_samples: bool = field(default=False, metadata={"help": "Skip missing/corrupt images and unfit samples (listed in output_dir) instead of stopping."})
    allow_images_outside_folder: bool = field(default=False, metadata={"help": "Allow image paths with ../ or absolute paths."})
    max_bad_sample_fraction: float = field(default=0.01, metadata={"help": "With --skip_bad_samples, stop when more than this fraction is bad."})
    data_cache_dir: str | None = field(default=None, metadata={"help": "Where the check before training is remembered (a warm start skips it): default .llava_tiny_cache/ beside the data, else ~/.cache/llava_tiny; 'none' turns it off."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "Sequences are truncated by whole turns to this."})
    bits: int = field(default=16, metadata={"help": "4 or 8: quantize the LLM (QLoRA); 16: no quantization."})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA double quantization."})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA 4-bit type: nf4 or fp4."})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA targets: all-linear (every linear layer of the language model but lm_head) or a comma list of module names, e.g. q_proj,v_proj."})
    lora_weight_path: str = field(default="", metadata={"help": "No effect: accepted for LLaVA compatibility."})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Keep the projector frozen."})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Projector learning rate (own parameter group)."})
    mm_vision_tower_lr: float | None = field(default=None, metadata={"help": "Vision tower learning rate when unfrozen."})
    group_by_modality_length: bool = field(default=False, metadata={"help": "Batches of image-only or text-only samples, grouped by length."})
    packing: bool = field(default=False, metadata={"help": "Padding-free batches: each batch packed into one row, attention kept within each sample, logits only for supervised tokens (sdpa or flash_attention_2)."})
    chunked_ce: bool = field(default=False, metadata={"help": "Compute the loss from hidden states in chunks: no full-vocabulary logits for every position at once."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached (every from_pretrained)."})
    mpt_attn_impl: str | None = field(default=None, metadata={"help": "No effect: LLaVA's MPT option."})
    remove_unused_columns: bool = False
    optim: str = "adamw_torch"
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over in an output_dir that holds another run."})
    skip_nan_steps: bool = field(default=False, metadata={"help": "On a NaN/inf loss, skip the step and count it instead of stopping."})
    ddp_timeout: int = field(default=DDP_TIMEOUT, metadata={"help": "Seconds a collective may wait for the other processes before the job stops with every rank's stack (HF's default is 1800)."})

    def own_flag_problems(self, model_args, data_args) -> list[str]:
        """Problems with the flags a subclass adds (`train_dpo.DPOTrainingArguments`), reported with the rest."""
        return []


class RunArguments(NamedTuple):
    """The parsed flags of one run (unpacks as `model_args, data_args, training_args`)."""

    model: ModelArguments
    data: DataArguments
    training: TrainingArguments


# Flags renamed by transformers that LLaVA scripts still pass.
# (--warmup_ratio R: transformers 5 reads a warmup_steps value below 1 as a ratio.)
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}


def _normalise_argv(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        i += 1
        if name == "--group_by_length":
            # transformers 5 replaced this bool with --train_sampling_strategy group_by_length.
            if not eq and i < len(argv) and argv[i].lower() in ("true", "false", "1", "0"):
                value, i = argv[i], i + 1
            if value.lower() in ("", "true", "1"):
                out += ["--train_sampling_strategy", "group_by_length"]
            continue
        out.append(RENAMED_FLAGS.get(name, name) + eq + value)
    return out


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _adapt_precision_flags(argv: list[str]) -> list[str]:
    """On a CPU, --bf16/--fp16/--tf32 True become fp32 with one log line (the dtype policy)."""
    if _on_gpu():
        return argv
    out, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in ("--bf16", "--fp16", "--tf32"):
            out.append(argv[i])
            i += 1
            continue
        if not eq:  # "--bf16 True" or a bare "--bf16"
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "True"
            i += 1 if not has_value else 2
        else:
            i += 1
        if value.lower() in ("true", "1", "yes"):
            logger.warning("%s True ignored: no GPU here, training in float32 on the CPU", name)
    return out


def _configure_reporting(args: TrainingArguments) -> None:
    """wandb never prompts on a batch node: offline unless logged in, or off if not installed."""
    if "wandb" not in (args.report_to or []):
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        logger.warning("--report_to wandb: wandb is not installed (pip install llava-tiny[wandb]); not reporting to it")
        args.report_to = [r for r in args.report_to if r != "wandb"]
        return
    logged_in = os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc"))
    if not logged_in and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = "offline"
        logger.warning("--report_to wandb: no wandb login found; logging offline (sync later with `wandb sync`)")


def _ddp_timeout(argv: list[str]) -> int:
    """--ddp_timeout from the command line (the process group exists before the flags are parsed)."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--ddp_timeout":
            return int(value if eq else argv[i + 1])
    return DDP_TIMEOUT


def _init_cpu_distributed(argv: list[str]) -> None:
    """DeepSpeed on a CPU: gloo, initialised before TrainingArguments (else the batch-size check fails)."""
    if _on_gpu() or not any(a.split("=")[0] == "--deepspeed" for a in argv):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    from .._quiet import announce_deepspeed_cpu_build

    announce_deepspeed_cpu_build()  # the first CPU run compiles a C++ op (~1 min): say so
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=_ddp_timeout(argv)))


# LLaVA flags accepted so that users' scripts run, with no effect here (named once at start).
NO_EFFECT_FLAGS = ("--lazy_preprocess", "--is_multimodal", "--lora_weight_path", "--mpt_attn_impl")
# Flags for the tower, the projector and images: named the same way in a text-only run, which has none of them.
VISION_ONLY_FLAGS = ("--mm_projector_lr", "--mm_vision_tower_lr", "--mm_projector_type", "--mm_vision_select_layer",
                     "--mm_vision_select_feature", "--freeze_mm_mlp_adapter", "--unfreeze_mm_vision_tower",
                     "--image_aspect_ratio", "--image_background", "--image_folder", "--image_grid_pinpoints")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class FlagError(ValueError):
    """Flags that cannot run together or point at nothing; the message lists every problem by flag."""


def flag_problems(model_args, data_args, training_args) -> list[str]:
    """Every problem with the flags, each naming its flag; checked before any model loads."""
    from ..anyres import anyres_flag_problems
    from ..conversation import get_template
    from ..images import ASPECT_RATIOS
    from ..model.projector import projector_depth
    from .starting_point import starting_point_problems

    problems = []
    if data_args.data_path is None:
        problems.append("--data_path is required (LLaVA JSON or JSONL)")
    for flag, path in (("--data_path", data_args.data_path), ("--eval_data_path", data_args.eval_data_path)):
        if path is not None and not os.path.isfile(path):
            problems.append(f"{flag} {path}: no such file; expected a LLaVA JSON or JSONL data file")
    if data_args.image_folder is not None and not os.path.isdir(data_args.image_folder):
        problems.append(f"--image_folder {data_args.image_folder}: no such folder")
    if data_args.image_aspect_ratio not in (*ASPECT_RATIOS, "anyres"):
        problems.append(f"--image_aspect_ratio {data_args.image_aspect_ratio!r}: expected one of {ASPECT_RATIOS} or anyres")
    adapter = model_args.pretrain_mm_mlp_adapter
    if adapter and adapter.endswith(PICKLE_SUFFIXES):  # LLaVA's released stage-1 projectors are pickles
        problems.append(f"--pretrain_mm_mlp_adapter {adapter}: pickled weights are never loaded here (unpickling can "
                        "run code, CVE-2025-32434); convert it first: python scripts/convert_bin_to_safetensors.py "
                        f"{adapter} CONVERTED_DIR, then pass CONVERTED_DIR")
    elif adapter and not os.path.exists(adapter):
        problems.append(f"--pretrain_mm_mlp_adapter {adapter}: no such file or folder")
    for flag, check in (("--mm_projector_type", lambda: projector_depth(model_args.mm_projector_type)),
                        ("--version", lambda: model_args.version is None or get_template(model_args.version))):
        try:
            check()
        except ValueError as err:
            problems.append(f"{flag}: {err}")
    if model_args.mm_vision_select_feature not in ("patch", "cls_patch"):
        problems.append(f"--mm_vision_select_feature {model_args.mm_vision_select_feature!r}: expected patch or cls_patch")
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        problems.append("--mm_use_im_start_end / --mm_use_im_patch_token are LLaVA-1.0 options that LLaVA-1.5 "
                        "recipes set to False; this project supports only False")
    problems += anyres_flag_problems(data_args.image_aspect_ratio, data_args.image_grid_pinpoints,
                                     model_args.mm_patch_merge_type)
    if training_args.bits not in (4, 8, 16):
        problems.append(f"--bits {training_args.bits}: expected 4, 8 or 16")
    elif training_args.bits in (4, 8) and not training_args.lora_enable:
        problems.append(f"--bits {training_args.bits} quantizes the LLM, which can then only be trained with "
                        "--lora_enable True")
    if model_args.tune_mm_mlp_adapter and training_args.lora_enable:
        problems.append("--tune_mm_mlp_adapter (stage 1) trains only the projector; do not combine it with --lora_enable")
    if model_args.tune_mm_mlp_adapter and training_args.freeze_mm_mlp_adapter:
        problems.append("--tune_mm_mlp_adapter with --freeze_mm_mlp_adapter: nothing would train")
    if training_args.skip_nan_steps and training_args.deepspeed:
        problems.append("--skip_nan_steps cannot be used with --deepspeed: DeepSpeed applies the update inside "
                        "backward, so a step cannot be dropped after its loss is seen. Without it, the run stops at "
                        "a NaN/inf loss with the step, the sample ids and the last good checkpoint")
    if training_args.chunked_ce and transformers.integrations.is_deepspeed_zero3_enabled():
        # Recomputing a chunk re-runs lm_head in backward, where ZeRO-3 hands a frozen lm_head's
        # partitioned (empty) weight: torch.utils.checkpoint then fails on the mismatch.
        problems.append("--chunked_ce cannot run under ZeRO-3; use ZeRO-2, or drop --chunked_ce (with --packing "
                        "logits are computed only for supervised tokens)")
    return problems + starting_point_problems(model_args, training_args)


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


def parse_args(argv: list[str] | None = None, training_class: type | None = None) -> RunArguments:
    """Parse LLaVA-style flags into (model, data, training) arguments; `FlagError` lists every problem.

    `training_class`: a `TrainingArguments` subclass with more flags (DPO's), checked by its `own_flag_problems`."""
    argv = _adapt_precision_flags(_normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    if not _on_gpu() and not any(a.split("=")[0] == "--use_cpu" for a in argv):
        argv += ["--use_cpu", "True"]  # must be set when TrainingArguments is created (world size)
    _init_cpu_distributed(argv)
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, training_class or TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # An empty value is a flag not given: the scripts pass "$VISION_TOWER", and VISION_TOWER="" is a text-only run.
    model_args.vision_tower = model_args.vision_tower or None
    data_args.image_folder = data_args.image_folder or None
    problems = flag_problems(model_args, data_args, training_args)
    problems += training_args.own_flag_problems(model_args, data_args)
    if problems:
        raise FlagError("invalid flags:\n" + "\n".join(f"  {p}" for p in problems))
    _name_flags_without_effect(argv, model_args, training_args)
    if not _on_gpu():
        training_args.dataloader_pin_memory = False
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    _configure_reporting(training_args)
    return RunArguments(model_args, data_args, training_args)
