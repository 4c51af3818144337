"""The layout haotian-liu/LLaVA writes (`model_type: llava_llama`), read the way transformers' own
conversion (`convert_llava_weights_to_hf.py`) maps it:

    config.json   Llama fields + mm_vision_tower, mm_projector_type, mm_hidden_size, mm_vision_select_layer
    weights       model.layers.* / model.embed_tokens / model.norm / lm_head.*  -> the language model
                  model.mm_projector.0.* / .2.* (mlp2x_gelu) or model.mm_projector.* (linear) -> the projector
                  (the vision tower is not in the weights: it loads from mm_vision_tower)

Only safetensors are read; a folder holding only `.bin` pickles is refused with the command that
converts it (`scripts/convert_bin_to_safetensors.py` keeps the key names, so its output loads here).
"""
from __future__ import annotations

import json
import os
import re

from safetensors import safe_open

LLAVA_ORIGINAL_TYPES = ("llava_llama", "llava_mistral", "llava_qwen")
# LLaVA's projector Sequential indexes its Linear layers 0, 2, 4, ... (GELU in between).
_PROJECTOR_KEY = re.compile(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$")


def is_llava_original(config: dict) -> bool:
    """A config written by LLaVA's own code (not transformers' LLaVA)."""
    return config.get("model_type") in LLAVA_ORIGINAL_TYPES or (
        "mm_vision_tower" in config and "vision_config" not in config and "text_config" not in config)


def text_config_dict(config: dict) -> dict:
    """The language model's config: LLaVA's fields without the multimodal ones, as the base model type."""
    text = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in (
        "architectures", "image_aspect_ratio", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj",
        "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length")}
    text["model_type"] = {"llava_mistral": "mistral", "llava_qwen": "qwen2"}.get(config.get("model_type"), "llama")
    return text


def pickled_weights_error(folder: str, pickles: list[str]) -> ValueError:
    """The refusal of a folder whose weights are only pickles, with the command that converts them."""
    return ValueError(f"{folder} holds only pickled weights ({', '.join(sorted(pickles)[:3])}): they are never "
                      "unpickled here (unpickling can run code, CVE-2025-32434). Convert them first: python "
                      f"scripts/convert_bin_to_safetensors.py {folder} CONVERTED_DIR, then pass CONVERTED_DIR")


def weight_files(folder: str) -> list[str]:
    """The folder's safetensors weights; `.bin`-only folders are refused, never unpickled."""
    names = sorted(os.listdir(folder))
    safe = [n for n in names if n.endswith(".safetensors") and n.startswith("model")]
    if safe:
        return [os.path.join(folder, n) for n in safe]
    pickles = [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")]
    if pickles:
        raise pickled_weights_error(folder, pickles)
    raise FileNotFoundError(f"{folder}: a LLaVA config.json but no weights; expected model*.safetensors")


def projector_from(tensors: dict, where: str) -> dict:
    """LLaVA's `model.mm_projector.*` tensors renamed for `MlpProjector` (`linear_1`, `linear_2`, ...)."""
    state = {}
    for key, tensor in tensors.items():
        match = _PROJECTOR_KEY.match(key.removeprefix("base_model.model."))  # peft's prefix in LoRA folders
        if match:
            index, kind = match.groups()
            state[f"linear_{1 if index is None else int(index) // 2 + 1}.{kind}"] = tensor
    if not state:
        raise ValueError(f"{where}: no model.mm_projector.* weights found; expected LLaVA's projector "
                         "(model.mm_projector.0.weight, ...)")
    return state


def projector_state(folder: str) -> dict:
    """The projector of a LLaVA-layout folder, read from its safetensors."""
    tensors = {}
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys() if "mm_projector" in key})
    return projector_from(tensors, folder)


def read_original_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)
