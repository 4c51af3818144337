"""Merge a LoRA checkpoint into its base model and save a full, stock-loadable model.

    python scripts/merge_lora.py --model-path runs/lora --model-base TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        --save-path runs/lora-merged

The merge runs on the CPU in float32 (merging in bfloat16 rounds every adapted weight). Before
anything is written, the merged model's logits on a probe input (a prompt with an image) are
compared with the unmerged model's; a difference above `--tolerance` stops with exit status 1 and
the measured difference. The result is safetensors, loadable by stock
`transformers.LlavaForConditionalGeneration` for the `mlp2x_gelu` projector.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MergeMismatchError(RuntimeError):
    """Merged and unmerged logits disagree beyond the tolerance."""


def require_empty_dir(path: str) -> None:
    """Refuse to write into a folder that already holds files (an earlier export, a checkpoint)."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"--save-path {path} already exists and is not empty; choose a new folder")


def recorded_dtype(checkpoint: str) -> torch.dtype:
    """The dtype written in the checkpoint's config.json (what it was trained/saved in); float32 if none."""
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def merge_lora_checkpoint(model_path: str, save_path: str, model_base: str | None = None,
                          save_dtype: str = "auto", tolerance: float = 1e-4) -> float:
    """Merge the LoRA checkpoint at `model_path` and save the full model to `save_path`.

    Returns the max |logit difference| between the merged and unmerged model on the probe input;
    raises `MergeMismatchError` (writing nothing) when it exceeds `tolerance`.
    """
    from llava_tiny.inference import probe_inputs
    from llava_tiny.model.builder import checkpoint_kind, load_pretrained_model, save_model

    require_empty_dir(save_path)
    kind = checkpoint_kind(model_path)
    if kind != "lora":
        raise ValueError(f"{model_path} is a {kind} checkpoint, not a LoRA one (no adapter_config.json); "
                         "use scripts/export_hf.py to export it")
    dtype = recorded_dtype(model_path) if save_dtype == "auto" else DTYPES[save_dtype]
    loaded = load_pretrained_model(model_path, model_base=model_base, device="cpu", dtype=torch.float32,
                                   merge_lora=False)
    probe = probe_inputs(loaded)
    with torch.no_grad():
        unmerged_logits = loaded.model(**probe).logits
        merged = loaded.model.merge_and_unload()
        merged_logits = merged(**probe).logits
    difference = (merged_logits - unmerged_logits).abs().max().item()
    if not difference <= tolerance:  # also catches NaN
        raise MergeMismatchError(f"merged and unmerged logits differ by {difference:.3e} on the probe input "
                                 f"(tolerance {tolerance:.0e}); nothing was written to {save_path}")
    loaded.model = merged.to(dtype)
    save_model(loaded, save_path)
    return difference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", "--model_path", required=True, help="the LoRA checkpoint folder")
    parser.add_argument("--model-base", "--model_base", default=None,
                        help="base LLM (default: the path recorded in the checkpoint's config.json)")
    parser.add_argument("--save-path", "--save_path", required=True, help="new (or empty) folder for the merged model")
    parser.add_argument("--save-dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the saved weights (auto: the one recorded in the checkpoint)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| merged vs unmerged")
    args = parser.parse_args(argv)
    try:
        difference = merge_lora_checkpoint(args.model_path, args.save_path, args.model_base, args.save_dtype,
                                           args.tolerance)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MergeMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {args.model_path} into {args.save_path} (max |logit difference| {difference:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
