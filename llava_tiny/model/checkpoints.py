"""What a checkpoint folder holds, and the one writer and reader of each kind.

    full       model.safetensors (or shards) + config.json + tokenizer/processor
               (stock `LlavaForConditionalGeneration` loads it when the projector is mlp2x_gelu)
    text       a causal LM (text-only runs): model.safetensors + config.json + tokenizer
    lora       adapter_config.json + adapter_model.safetensors (peft) + non_lora_trainables.safetensors
               (every other trained weight: the projector, the tower when tuned) + config.json + processor;
               a text-only LoRA keeps its base config as base_config.json instead (a stock PEFT folder:
               `AutoModelForCausalLM.from_pretrained(folder)` loads it)
    projector  mm_projector.safetensors (stage 1) + config.json (recording the base parts) + processor

Read only: `llava_original` (LLaVA's own layout, `llava_original.py`). A folder's kind is read
from its files, never from its name. Training (through its recipe),
resuming, loading for inference and exporting all write and read through this module; a new
checkpoint kind is added here.
"""
from __future__ import annotations

import copy
import json
import logging
import os

import torch
from safetensors.torch import load_file, save_file

from ..images import processor_for_aspect_ratio
from .llava_original import is_llava_original, pickled_weights_error
from .modeling import LlavaTinyConfig
from .vision import num_image_tokens

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_trainables.safetensors"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json")
# Not config.json: next to adapter_config.json that tells stock transformers the base weights are in the folder,
# and its one-line load (`AutoModelForCausalLM.from_pretrained`) then looks for model.safetensors there.
BASE_CONFIG_FILE = "base_config.json"
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


def local_folder(path_or_id: str, cache_dir: str | None = None) -> str:
    """A local folder for `path_or_id`: itself, or the hub snapshot (from the cache when offline)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_id, cache_dir=cache_dir, allow_patterns=[
        "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.bin"])


def resolve_kind(path_or_id: str, cache_dir: str | None = None) -> str:
    """The kind of a local folder or a hub id (its files read from the hub cache when offline): the one
    resolver for training's starting point, loading for inference and serving, and export."""
    if os.path.isdir(path_or_id):
        return checkpoint_kind(path_or_id)
    from transformers.utils import cached_file  # a hub id: its config.json decides (read from the cache offline)

    if cached_file(path_or_id, "adapter_config.json", cache_dir=cache_dir,
                   _raise_exceptions_for_missing_entries=False):
        return "lora"
    config = read_json(cached_file(path_or_id, "config.json", cache_dir=cache_dir))
    if is_llava_original(config):
        return "llava_original"
    return "full" if config.get("model_type") in ("llava", "llava_tiny") else "text"


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def saved_config(path: str) -> dict:
    """The folder's config: config.json, a text-only LoRA's base_config.json, or {} (a stock PEFT folder)."""
    for name in ("config.json", BASE_CONFIG_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return read_json(os.path.join(path, name))
    return {}


def is_text_lora(path: str) -> bool:
    """Whether the LoRA folder `path` adapts a language model alone (no tower, no projector)."""
    config = saved_config(path)
    return config.get("model_type") not in ("llava", "llava_tiny") and not is_llava_original(config)


def read_config(path: str) -> LlavaTinyConfig:
    """The checkpoint's config as a `LlavaTinyConfig` (stock `llava` folders included)."""
    data = read_json(os.path.join(path, "config.json"))
    data.pop("model_type", None)
    data.pop("architectures", None)
    config = LlavaTinyConfig.from_dict(data)
    # Counted from the tower, as stock transformers' processor does: a stock LlavaConfig built around another
    # tower keeps the default 576 (written right on save).
    counted = num_image_tokens(config.vision_config, config.vision_feature_select_strategy)
    if config.image_seq_length != counted:
        vision = config.vision_config
        logger.warning("%s: config.json says image_seq_length %s, but its vision tower (%d px images, %d px patches, "
                       "%r features) gives %d tokens per image: using %d", path, config.image_seq_length,
                       vision.image_size, vision.patch_size, config.vision_feature_select_strategy, counted, counted)
        config.image_seq_length = counted
    return config


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
    if kind == "lora" and getattr(base.config, "vision_config", None) is None:
        _save_text_lora_config(base.config, output_dir)
    else:
        base.config.save_pretrained(output_dir)
    processor_for_stock_readers(processor, base.config).save_pretrained(output_dir)


def processor_for_stock_readers(processor, config):
    """`processor` with the image processor that prepares images as training did (`image_aspect_ratio`), so
    `AutoProcessor.from_pretrained(folder)` (transformers, lmms-eval, vLLM, SGLang) feeds the model what it
    was trained on. Transparent pixels are the one thing stock processors cannot follow: they composite
    onto white, so a model trained with `--image_background mean` is said to differ there."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(config, "vision_config", None) is None:
        return processor  # a text-only model: its processor is its tokenizer
    if getattr(config, "image_background", "white") != "white":
        logger.warning("trained with --image_background %s: stock readers of this folder (transformers, vLLM, "
                       "SGLang, lmms-eval) composite transparent pixels onto white; this project's own loaders "
                       "read image_background from config.json", config.image_background)
    stock = copy.copy(processor)
    stock.image_processor = processor_for_aspect_ratio(image_processor, getattr(config, "image_aspect_ratio", "pad"))
    return stock


def _save_text_lora_config(config, output_dir: str) -> None:
    """A text-only LoRA folder stays a stock PEFT folder: the base config under BASE_CONFIG_FILE, and the
    adapter's base is the folder the run started from when that was a checkpoint (a LoRA folder merged at
    start): the adapter applies to it, not to the original base peft records."""
    config.to_json_file(os.path.join(output_dir, BASE_CONFIG_FILE), use_diff=True)
    started_from = getattr(config, "mm_base_model", None)
    if started_from:
        adapter_config = read_json(os.path.join(output_dir, ADAPTER_CONFIG))
        adapter_config["base_model_name_or_path"] = started_from
        with open(os.path.join(output_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)


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
