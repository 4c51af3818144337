"""Load any checkpoint a user has, deciding what it is from its files (LLaVA's `load_pretrained_model`).

The kinds (`checkpoint_kinds.py`: full, llava_next, text, lora, projector, llava_original, and any registered later)
each know how to load themselves; `checkpoints.resolve_kind` says which one a folder or hub id is.
`load_checkpoint` gives the model as training starts from it; `load_pretrained_model` puts it on a
device in eval mode, for inference.
"""
from __future__ import annotations

import torch

from .assembly import LoadedModel, assemble_model, count_parameters, load_text_model, resolve_dtype  # noqa: F401
from .checkpoints import LoadOptions, load_kind


def load_pretrained_model(model_path: str, model_base: str | None = None, device: str | None = None,
                          dtype: torch.dtype | None = None, merge_lora: bool = True,
                          trust_remote_code: bool = False) -> LoadedModel:
    """Load any checkpoint kind (see `checkpoint_kinds.py`) on `device`, in eval mode."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(model_path, model_base, dtype=dtype or resolve_dtype(device), merge_lora=merge_lora,
                             trust_remote_code=trust_remote_code)
    loaded.model.to(device).eval()
    return loaded


def load_checkpoint(model_path: str, model_base: str | None = None, dtype: torch.dtype | None = None,
                    merge_lora: bool = True, version: str | None = None, vision_tower: str | None = None,
                    attn_implementation: str | None = None, quantization_config=None,
                    trust_remote_code: bool = False, cache_dir: str | None = None) -> LoadedModel:
    """The model in `model_path` as training starts from it: nothing re-initialised; `loaded.kind` is its kind.

    `version` replaces the recorded template; `vision_tower` is LLaVA's-layout tower when its
    config names none (other kinds carry their own tower).
    """
    return load_kind(model_path, LoadOptions(
        dtype=dtype or resolve_dtype(), attn_implementation=attn_implementation,
        quantization_config=quantization_config, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
        model_base=model_base, merge_lora=merge_lora, version=version, vision_tower=vision_tower))
