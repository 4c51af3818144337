"""What a checkpoint folder holds, and the one writer and reader of each kind.

    full       model.safetensors (or shards) + config.json + tokenizer/processor
               (stock `LlavaForConditionalGeneration` loads it when the projector is mlp2x_gelu)
    text       a causal LM (text-only runs): model.safetensors + config.json + tokenizer
    lora       adapter_config.json + adapter_model.safetensors (peft) + non_lora_trainables.safetensors
               (every other trained weight: the projector, the tower when tuned) + config.json + processor
    projector  mm_projector.safetensors (stage 1) + config.json (recording the base parts) + processor

Read only: `llava_original` (LLaVA's own layout, `llava_original.py`). A folder's kind is read
from its files, never from its name. Training (through its recipe),
resuming, loading for inference and exporting all write and read through this module; a new
checkpoint kind is added here.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .llava_original import is_llava_original, pickled_weights_error
from .modeling import LlavaTinyConfig

PROJECTOR_FILE = "mm_projector.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_trainables.safetensors"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")
PROJECTOR_PREFIX = "model.multi_modal_projector."


def unwrapped_name(name: str) -> str:
    """A parameter's name in the plain model: peft's 'base_model.model.' and '.base_layer' removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def checkpoint_kind(path: str) -> str:
    """What the folder `path` holds, from its files and config (never its name):

    'full' (a LLaVA: stock transformers or this project's), 'text' (a causal LM, no vision), 'lora',
    'projector' (stage 1) or 'llava_original' (LLaVA's own layout). Pickle-only folders are refused
    with the command that converts them; anything else with what was found and what was expected.
    """
    files = set(os.listdir(path)) if os.path.isdir(path) else set()
    if ADAPTER_CONFIG in files:
        return "lora"
    config = read_json(os.path.join(path, "config.json")) if "config.json" in files else {}
    if is_llava_original(config):
        return "llava_original"
    if any(f in files for f in MODEL_FILES) or any(f.startswith("model-") and f.endswith(".safetensors") for f in files):
        if config.get("model_type") in ("llava", "llava_tiny"):
            return "full"
        if "vision_config" in config:
            raise ValueError(f"{path}: a {config.get('model_type')!r} vision-language model; expected a LLaVA "
                             "(model_type llava, llava_tiny or LLaVA's llava_llama) or a causal language model")
        return "text"
    if PROJECTOR_FILE in files:
        return "projector"
    pickles = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    if pickles:
        raise pickled_weights_error(path, pickles)
    raise FileNotFoundError(
        f"{path} holds no model: expected {MODEL_FILES[0]} (full model), {ADAPTER_CONFIG} + adapter weights "
        f"(LoRA) or {PROJECTOR_FILE} (stage-1 projector); found {sorted(files) or 'nothing'}")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_config(path: str) -> LlavaTinyConfig:
    """The checkpoint's config as a `LlavaTinyConfig` (stock `llava` folders included)."""
    data = read_json(os.path.join(path, "config.json"))
    data.pop("model_type", None)
    data.pop("architectures", None)
    return LlavaTinyConfig.from_dict(data)


def _check_not_empty(state_dict: dict[str, torch.Tensor], where: str) -> None:
    # Under ZeRO-3 an empty tensor is a partitioned parameter that was not gathered: saving it would
    # write a checkpoint that cannot be loaded.
    empty = [k for k, v in state_dict.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save {where}: {len(empty)} empty tensors (ZeRO-3 partitions not gathered), "
                           f"e.g. {empty[:3]}; set stage3_gather_16bit_weights_on_model_save in the ZeRO config")


def _save_tensors(state: dict[str, torch.Tensor], path: str) -> None:
    save_file(state, path, metadata={"format": "pt"})


def save_checkpoint(kind: str, model, processor, output_dir: str, state_dict: dict | None = None) -> None:
    """Write `model` as a checkpoint of `kind` ('full', 'lora', 'projector').

    `model` is the unwrapped LLaVA (a `PeftModel` for 'lora'); `state_dict` holds tensors the caller
    gathered (ZeRO-3), else the model's own are used.
    """
    if kind not in ("full", "lora", "projector"):
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected 'full', 'lora' or 'projector'")
    os.makedirs(output_dir, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if kind == "projector":
        projector = {k: v for k, v in ((unwrapped_name(k), v) for k, v in state_dict.items())
                     if k.startswith(PROJECTOR_PREFIX)}
        _check_not_empty(projector, output_dir)
        _save_tensors(projector, os.path.join(output_dir, PROJECTOR_FILE))
    elif kind == "lora":
        trainable = {unwrapped_name(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        non_lora = {k: v for k, v in ((unwrapped_name(k), v) for k, v in state_dict.items() if "lora_" not in k)
                    if k in trainable}
        _check_not_empty(non_lora, output_dir)
        _check_not_empty({k: v for k, v in state_dict.items() if "lora_" in k}, output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        _save_tensors(non_lora, os.path.join(output_dir, NON_LORA_FILE))
    else:
        _check_not_empty(state_dict, output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    base = model.get_base_model() if kind == "lora" else model
    base.config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def load_projector_weights(model, path: str) -> None:
    """Load a stage-1 projector (`mm_projector.safetensors` or its folder) into `model`."""
    file = os.path.join(path, PROJECTOR_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no projector weights at {file}; expected a stage-1 folder holding {PROJECTOR_FILE}")
    state = {k.removeprefix(PROJECTOR_PREFIX): v for k, v in load_file(file).items()}
    projector = model.model.multi_modal_projector
    dtype = next(iter(projector.parameters())).dtype if list(projector.parameters()) else None
    projector.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)


def load_non_lora_trainables(model, checkpoint_dir: str) -> None:
    """Load a LoRA folder's non-adapter weights (projector, tuned tower) into the plain `model`."""
    path = os.path.join(checkpoint_dir, NON_LORA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint_dir} is a LoRA checkpoint without {NON_LORA_FILE} "
                                "(the projector and other non-LoRA trainables)")
    _, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected:
        raise ValueError(f"{path} holds weights the model does not have: {unexpected[:5]}")


def load_checkpoint_weights(kind: str, model, checkpoint_dir: str) -> None:
    """Load a checkpoint of `kind` into the live model it was trained from (resume, best model)."""
    if kind == "projector":
        load_projector_weights(model, checkpoint_dir)
    elif kind == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(os.path.join(checkpoint_dir, ADAPTER_FILE)))
        load_non_lora_trainables(model.get_base_model(), checkpoint_dir)
    else:
        _, unexpected = model.load_state_dict(load_file(os.path.join(checkpoint_dir, MODEL_FILES[0])), strict=False)
        if unexpected:
            raise ValueError(f"{checkpoint_dir}: weights the model does not have: {unexpected[:5]}")
