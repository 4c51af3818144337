"""What `--model_name_or_path` holds, told apart by its files and config (never its name), and the
model a run starts from:

    a causal LM + --vision_tower       a LLaVA assembled from the parts, fresh projector
                                       (or --pretrain_mm_mlp_adapter)
    a causal LM alone                  text-only fine-tuning
    a LLaVA (stock transformers, this  tower, projector and LLM all from it; nothing re-initialised;
    project's, or LLaVA's own layout)  --vision_tower may be omitted and must not name another tower
    a LoRA folder of this project      merged into its base, then trained further
"""
from __future__ import annotations

import logging
import os

from ..model.builder import assemble_model, load_checkpoint, load_text_model
from ..model.checkpoints import checkpoint_kind, read_json
from ..model.llava_original import is_llava_original
from ..model.vision import load_vision_config

logger = logging.getLogger(__name__)

VLM_STARTS = ("full", "llava_original", "lora")
# What makes two towers the same architecture (their weights come from the checkpoint anyway).
_TOWER_FIELDS = ("model_type", "hidden_size", "image_size", "patch_size", "num_hidden_layers")


def local_folder(path_or_id: str, cache_dir: str | None = None) -> str:
    """A local folder for `path_or_id`: itself, or the hub snapshot (from the cache when offline)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_id, cache_dir=cache_dir, allow_patterns=[
        "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.bin"])


def starting_kind(path_or_id: str, cache_dir: str | None = None) -> str:
    """'text' (a causal LM), 'full', 'llava_original', 'lora' or 'projector' (see checkpoints.py)."""
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


def starting_point_problems(model_args, training_args) -> list[str]:
    """Flag problems that depend on what the starting point is (read from its config, no weights)."""
    try:
        kind = starting_kind(model_args.model_name_or_path, training_args.cache_dir)
    except (OSError, ValueError) as err:
        return [f"--model_name_or_path {model_args.model_name_or_path}: {err}"]
    problems = []
    if kind == "projector":
        problems.append(f"--model_name_or_path {model_args.model_name_or_path} is a stage-1 projector folder: pass "
                        "it as --pretrain_mm_mlp_adapter, with the language model as --model_name_or_path")
    if kind == "text" and model_args.vision_tower is None and model_args.tune_mm_mlp_adapter:
        problems.append("--tune_mm_mlp_adapter trains a projector, which a text-only run (no --vision_tower) has not")
    if kind in VLM_STARTS and model_args.pretrain_mm_mlp_adapter:
        problems.append(f"--pretrain_mm_mlp_adapter: --model_name_or_path {model_args.model_name_or_path} is a "
                        "vision-language model that already has its projector")
    if kind == "lora" and training_args.bits in (4, 8):
        problems.append(f"--bits {training_args.bits} with a LoRA folder as --model_name_or_path: merge it first "
                        "(python scripts/merge_lora.py --model-path ... --save-path MERGED), then start from MERGED")
    if kind in ("full", "lora") and model_args.vision_tower:
        problems += _tower_conflict(local_folder(model_args.model_name_or_path, training_args.cache_dir),
                                    model_args.vision_tower, training_args.cache_dir)
    return problems


def _tower_conflict(folder: str, vision_tower: str, cache_dir: str | None) -> list[str]:
    config = read_json(os.path.join(folder, "config.json"))
    has = config.get("vision_config") or {}
    try:
        asked = load_vision_config(vision_tower, cache_dir=cache_dir).to_dict()
    except (OSError, ValueError) as err:
        return [f"--vision_tower {vision_tower}: {err}"]
    differ = [f for f in _TOWER_FIELDS if has.get(f) is not None and has.get(f) != asked.get(f)]
    if not differ:
        return []
    described = ", ".join(f"{f} {has.get(f)}" for f in _TOWER_FIELDS if has.get(f) is not None)
    named = config.get("mm_vision_tower")
    return [f"--vision_tower {vision_tower} is not the tower of {folder}, which has {named or 'its own'} tower "
            f"({described}); differs in {', '.join(differ)}. Omit --vision_tower: the checkpoint's tower is used"]


def load_starting_point(model_args, training_args, dtype, quantization_config=None,
                        attn_implementation: str | None = None):
    """The `LoadedModel` a run starts from (`starting_point_problems` has already passed)."""
    path = model_args.model_name_or_path
    options = {"dtype": dtype, "attn_implementation": attn_implementation, "quantization_config": quantization_config,
               "trust_remote_code": model_args.trust_remote_code, "cache_dir": training_args.cache_dir}
    kind = starting_kind(path, training_args.cache_dir)
    if kind == "text" and model_args.vision_tower is None:
        logger.info("%s is a language model and no --vision_tower was given: text-only fine-tuning", path)
        return load_text_model(path, model_args.version, image_token=False, **options)
    if kind == "text":
        return assemble_model(path, model_args.vision_tower, mm_projector_type=model_args.mm_projector_type,
                              mm_vision_select_layer=model_args.mm_vision_select_layer,
                              vision_select_strategy="full" if model_args.mm_vision_select_feature == "cls_patch"
                              else None, version=model_args.version, **options)
    folder = local_folder(path, training_args.cache_dir)
    loaded = load_checkpoint(folder, version=model_args.version, vision_tower=model_args.vision_tower, **options)
    loaded.model.config.mm_base_model = str(path)  # LoRA and projector folders of this run rebuild from it
    logger.info("starting from the %s checkpoint %s: tower, projector (%s) and language model as saved there",
                kind, path, loaded.model.config.mm_projector_type)
    return loaded
