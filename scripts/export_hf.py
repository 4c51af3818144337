"""Export any checkpoint (full, LoRA, stage-1 projector) to the stock transformers LLaVA layout.

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
from __future__ import annotations

import argparse
import logging
import sys

import torch

from merge_lora import DTYPES, recorded_dtype, require_empty_dir

logger = logging.getLogger("export_hf")


class ExportMismatchError(RuntimeError):
    """The exported folder, loaded back, does not compute what the source model computes."""


def stock_llava_note(projector_type: str) -> str | None:
    """Why this export is not a stock LLaVA folder (None when it is)."""
    from llava_tiny.model.projector import is_stock_llava_projector

    if is_stock_llava_projector(projector_type):
        return None
    return (f"mm_projector_type {projector_type!r} cannot be expressed by stock transformers LLaVA "
            "(LlavaForConditionalGeneration has only the 2-layer GELU MLP, 'mlp2x_gelu'). The export keeps "
            "model_type 'llava_tiny': it loads with `import llava_tiny.model.modeling` and "
            "AutoModelForImageTextToText, not with plain transformers, vLLM or SGLang.")


def export_checkpoint(model_path: str, save_path: str, model_base: str | None = None, save_dtype: str = "auto",
                      verify: bool = True, tolerance: float = 1e-4) -> dict:
    """Export `model_path` to `save_path`; returns {"kind", "model_type", "stock", "max_difference"}."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    from llava_tiny.inference import probe_inputs
    from llava_tiny.model.builder import load_pretrained_model, save_model

    require_empty_dir(save_path)
    dtype = recorded_dtype(model_path) if save_dtype == "auto" else DTYPES[save_dtype]
    loaded = load_pretrained_model(model_path, model_base=model_base, device="cpu", dtype=torch.float32,
                                   merge_lora=True)
    note = stock_llava_note(loaded.model.config.mm_projector_type)
    if note:
        logger.warning(note)
    loaded.model.to(dtype)
    save_model(loaded, save_path)
    result = {"kind": loaded.kind, "model_type": "llava" if note is None else "llava_tiny", "stock": note is None,
              "max_difference": None}
    if not verify:
        return result
    # Compare in float32 against the saved (possibly rounded) weights: upcasting them is exact.
    loaded.model.to(torch.float32)
    probe = probe_inputs(loaded)
    reloaded = AutoModelForImageTextToText.from_pretrained(save_path, dtype=torch.float32).eval()
    if note is None and type(reloaded) is not LlavaForConditionalGeneration:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", "--model_path", required=True, help="full, LoRA or projector checkpoint")
    parser.add_argument("--model-base", "--model_base", default=None,
                        help="base LLM for LoRA/projector checkpoints (default: the path recorded in config.json)")
    parser.add_argument("--save-path", "--save_path", required=True, help="new (or empty) export folder")
    parser.add_argument("--save-dtype", choices=["auto", *DTYPES], default="auto",
                        help="dtype of the saved weights (auto: the one recorded in the checkpoint)")
    parser.add_argument("--no-verify", action="store_true", help="skip loading the export back to compare logits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = export_checkpoint(args.model_path, args.save_path, args.model_base, args.save_dtype,
                                   verify=not args.no_verify)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    difference = result["max_difference"]
    checked = "" if difference is None else f"; reloaded logits match (max diff {difference:.1e})"
    layout = ("stock transformers LLaVA layout" if result["stock"]
              else "model_type llava_tiny (NOT loadable by stock transformers LLaVA)")
    print(f"exported {result['kind']} checkpoint {args.model_path} to {args.save_path}: {layout}{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
