"""The command line before the flags are parsed: LLaVA's flag names that transformers renamed, GPU-only flags on
a CPU (`--bf16`, `--fp16`, `--tf32` become float32, with one log line each, instead of a crash), and the process
group a CPU DeepSpeed run needs before `TrainingArguments` exists; after parsing, `--report_to wandb` made safe for
a batch node.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

logger = logging.getLogger(__name__)

# Well under HF's 30 minutes: a hung or dead rank ends the job in 10 minutes, not 30 (raise it for saves or
# evaluations that keep the other ranks waiting longer).
DDP_TIMEOUT = 600

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


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _adapt_precision_flags(argv: list[str]) -> list[str]:
    """On a CPU, --bf16/--fp16/--tf32 True become fp32 with one log line (the dtype policy)."""
    if on_gpu():
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


def configure_reporting(args) -> None:
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
    if on_gpu() or not any(a.split("=")[0] == "--deepspeed" for a in argv):
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


def prepare_argv(argv: list[str]) -> list[str]:
    """The command line as HfArgumentParser should read it (renamed and GPU-only flags adapted, --use_cpu on a CPU);
    a CPU DeepSpeed run's process group is started here."""
    argv = _adapt_precision_flags(_normalise_argv(argv))
    if not on_gpu() and not any(a.split("=")[0] == "--use_cpu" for a in argv):
        argv += ["--use_cpu", "True"]  # must be set when TrainingArguments is created (world size)
    _init_cpu_distributed(argv)
    return argv
