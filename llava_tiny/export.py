"""Merge LoRA checkpoints and export any checkpoint to the stock transformers LLaVA layout.

The scripts `scripts/merge_lora.py` and `scripts/export_hf.py` call `merge_main` / `export_main`.
Both write only into a new (or empty) folder, and check the result's logits on a probe input
before (merge) or after (export) writing.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlavaForConditionalGeneration

from .inference import probe_inputs
from .model.builder import load_pretrained_model
from .model import image_seq_length
from .model.checkpoints import local_folder, resolve_kind, saved_config
from .model.projector import is_stock_llava_projector

logger = logging.getLogger(__name__)

MERGE_USAGE = """Merge a LoRA checkpoint into its base model and save a full, stock-loadable model.

    python scripts/merge_lora.py --model-path runs/lora --model-base TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        --save-path runs/lora-merged

The merge runs on the CPU in float32 (merging in bfloat16 rounds every adapted weight). Before
anything is written, the merged model's logits on a probe input (a prompt with an image) are
compared with the unmerged model's; a difference above `--tolerance` stops with exit status 1 and
the measured difference. The result is safetensors, loadable by stock
`transformers.LlavaForConditionalGeneration` for the `mlp2x_gelu` projector.
"""

EXPORT_USAGE = """Export any checkpoint (full, LoRA, stage-1 projector) to the stock transformers LLaVA layout.

    python scripts/export_hf.py --model-path runs/lora [--model-base BASE] --save-path exports/my-llava

The folder (config.json with `model_type: "llava"`, model.safetensors, tokenizer, processor, chat
template) loads with plain `transformers.LlavaForConditionalGeneration.from_pretrained(dir)` and
`AutoProcessor`, so vLLM, SGLang and transformers users can serve it without this project.

Only the `mlp2x_gelu` projector exists in stock LLaVA. Other projector types (`linear`,
`mlp3x_gelu`, `identity`) are exported with `model_type: "llava_tiny"`, which needs this package
to load; the script says so. After saving, the folder is loaded back with transformers' Auto
classes and its logits on a probe input are checked against the source model (`--no-verify` skips
this, saving the memory of a second copy).
"""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MergeMismatchError(RuntimeError):
    """Merged and unmerged logits disagree beyond the tolerance."""


def require_empty_dir(path: str) -> None:
    """Refuse to write into a folder that already holds files (an earlier export, a checkpoint)."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"--save-path {path} already exists and is not empty; choose a new folder")


def recorded_dtype(checkpoint: str) -> torch.dtype:
    """The dtype written in the checkpoint's config (what it was trained/saved in); float32 if none."""
    config = saved_config(checkpoint)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def scaled_tolerance(tolerance: float, reference: torch.Tensor) -> float:
    """The merge's allowed |logit difference|: `tolerance` relative to the largest reference logit, and
    absolute below 1.

    Merging replaces x @ (W + s*B@A) with the unmerged x @ W + s*(x @ A) @ B: the same sums rounded in another
    order. float32 rounding error is relative (~6e-8 per operation, growing with the length of each sum and
    the number of layers), so the difference in a logit scales with the logits' magnitude: a fixed 1e-4
    that holds for a 64-wide model is used up by a deeper, wider one (a 135M model already used 87% of it)
    and would fail a correct 1.1B merge. A wrong merge (lost scaling, an adapter left out) is off by the
    adapter's whole contribution, orders of magnitude more than 1e-4 of the logits."""
    return tolerance * max(1.0, reference.abs().max().item())


def merge_lora_checkpoint(model_path: str, save_path: str, model_base: str | None = None,
                          save_dtype: str = "auto", tolerance: float = 1e-4) -> float:
    """Merge the LoRA checkpoint at `model_path` and save the full model to `save_path`.

    Returns the max |logit difference| between the merged and unmerged model on the probe input;
    raises `MergeMismatchError` (writing nothing) when it exceeds `tolerance` relative to the logits
    (`scaled_tolerance`). LLaVA's own LoRA layout merges as it loads (its adapter sits on the bare LLM): the difference is then 0 by construction.
    """
    require_empty_dir(save_path)
    model_path = local_folder(model_path)  # a hub id: its snapshot (from the cache when offline)
    kind = resolve_kind(model_path)
    if not kind.is_adapter:
        raise ValueError(f"{model_path} is a {kind} checkpoint, not a LoRA one (no adapter_config.json); "
                         "use scripts/export_hf.py to export it")
    dtype = recorded_dtype(model_path) if save_dtype == "auto" else DTYPES[save_dtype]
    loaded = load_pretrained_model(model_path, model_base=model_base, device="cpu", dtype=torch.float32,
                                   merge_lora=False)
    if not hasattr(loaded.model, "merge_and_unload"):
        logger.info("%s is LLaVA's own LoRA layout: merged while loading", model_path)
        loaded.model.to(dtype)
        loaded.save_pretrained(save_path)
        return 0.0
    probe = probe_inputs(loaded)
    with torch.no_grad():
        unmerged_logits = loaded.model(**probe).logits
        merged = loaded.model.merge_and_unload()
        merged_logits = merged(**probe).logits
    difference = (merged_logits - unmerged_logits).abs().max().item()
    allowed = scaled_tolerance(tolerance, unmerged_logits)
    if not difference <= allowed:  # also catches NaN
        raise MergeMismatchError(f"merged and unmerged logits differ by {difference:.3e} on the probe input "
                                 f"(tolerance {tolerance:.0e} x max(1, max |logit|) = {allowed:.2e}); nothing was "
                                 f"written to {save_path}")
    logger.info("merge parity: max |logit difference| %.2e, %.0f%% of the allowed %.2e", difference,
                100 * difference / allowed, allowed)
    loaded.model = merged.to(dtype)
    loaded.save_pretrained(save_path)
    return difference


class ExportMismatchError(RuntimeError):
    """The exported folder, loaded back, does not compute what the source model computes."""


def stock_llava_note(projector_type: str) -> str | None:
    """Why this export is not a stock LLaVA folder (None when it is)."""
    if is_stock_llava_projector(projector_type):
        return None
    return (f"mm_projector_type {projector_type!r} cannot be expressed by stock transformers LLaVA "
            "(LlavaForConditionalGeneration has only the 2-layer GELU MLP, 'mlp2x_gelu'). The export keeps "
            "model_type 'llava_tiny': it loads with `import llava_tiny.model` and "
            "AutoModelForImageTextToText, not with plain transformers, vLLM or SGLang.")


def export_checkpoint(model_path: str, save_path: str, model_base: str | None = None, save_dtype: str = "auto",
                      verify: bool = True, tolerance: float = 1e-4) -> dict:
    """Export `model_path` to `save_path`; returns {"kind", "model_type", "stock", "max_difference"}."""
    require_empty_dir(save_path)
    model_path = local_folder(model_path)  # a hub id: its snapshot (from the cache when offline)
    dtype = recorded_dtype(model_path) if save_dtype == "auto" else DTYPES[save_dtype]
    loaded = load_pretrained_model(model_path, model_base=model_base, device="cpu", dtype=torch.float32,
                                   merge_lora=True)
    vision = bool(image_seq_length(loaded.model))
    note = stock_llava_note(loaded.model.config.mm_projector_type) if vision else None
    if note:
        logger.warning(note)
    loaded.model.to(dtype)
    loaded.save_pretrained(save_path)
    model_type = loaded.model.config.model_type if not vision else "llava" if note is None else "llava_tiny"
    result = {"kind": loaded.kind, "model_type": model_type, "stock": note is None, "max_difference": None}
    if not verify:
        return result
    # Compare in float32 against the saved (possibly rounded) weights: upcasting them is exact.
    loaded.model.to(torch.float32)
    probe = probe_inputs(loaded)
    auto_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    reloaded = auto_class.from_pretrained(save_path, dtype=torch.float32).eval()
    if vision and note is None and type(reloaded) is not LlavaForConditionalGeneration:
        raise ExportMismatchError(f"{save_path} loads as {type(reloaded).__name__}, not LlavaForConditionalGeneration")
    with torch.no_grad():
        expected = loaded.model(**probe).logits
        got = reloaded(**probe).logits
    difference = (got - expected).abs().max().item()
    if not difference <= tolerance:
        raise ExportMismatchError(f"{save_path}, loaded back with transformers, differs from the source model by "
                                  f"{difference:.3e} in the logits (tolerance {tolerance:.0e})")
    result["max_difference"] = difference
    return result


def _parser(usage: str, model_path_help: str, save_path_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", "--model_path", required=True, help=model_path_help)
    parser.add_argument("--model-base", "--model_base", default=None,
                        help="base LLM for LoRA/projector checkpoints (default: the path recorded in config.json)")
    parser.add_argument("--save-path", "--save_path", required=True, help=save_path_help)
    parser.add_argument("--save-dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the saved weights (auto: the one recorded in the checkpoint)")
    return parser


def _run(action, mismatch: type[Exception]) -> int:
    """Exit status 2 for bad input, 1 for a logit mismatch (nothing written), 0 after `action()`."""
    try:
        action()
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except mismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def merge_main(argv=None) -> int:
    """`scripts/merge_lora.py`: merge a LoRA checkpoint into its base and save a full model."""
    parser = _parser(MERGE_USAGE, "the LoRA checkpoint folder", "new (or empty) folder for the merged model")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| merged vs unmerged, relative to the largest logit "
                        "(absolute when all logits are below 1)")
    args = parser.parse_args(argv)

    def merge():
        difference = merge_lora_checkpoint(args.model_path, args.save_path, args.model_base, args.save_dtype,
                                           args.tolerance)
        print(f"merged {args.model_path} into {args.save_path} (max |logit difference| {difference:.2e})")

    return _run(merge, MergeMismatchError)


def export_main(argv=None) -> int:
    """`scripts/export_hf.py`: export any checkpoint to the stock transformers LLaVA layout."""
    parser = _parser(EXPORT_USAGE, "full, LoRA or projector checkpoint", "new (or empty) export folder")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the export back to compare logits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def export():
        result = export_checkpoint(args.model_path, args.save_path, args.model_base, args.save_dtype,
                                   verify=not args.no_verify)
        difference = result["max_difference"]
        checked = "" if difference is None else f"; reloaded logits match (max diff {difference:.1e})"
        layout = ("stock transformers LLaVA layout" if result["stock"]
                  else "model_type llava_tiny (NOT loadable by stock transformers LLaVA)")
        print(f"exported {result['kind']} checkpoint {args.model_path} to {args.save_path}: {layout}{checked}")

    return _run(export, ExportMismatchError)
