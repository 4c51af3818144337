"""What `--model_name_or_path` holds, told apart by its files and config (never its name), and the
model a run starts from:

    a causal LM + --vision_tower       a LLaVA assembled from the parts, fresh projector
                                       (or --pretrain_mm_mlp_adapter)
    a causal LM alone                  text-only fine-tuning
    a LLaVA (stock transformers, this  tower, projector and LLM all from it; nothing re-initialised;
    project's, or LLaVA's own layout)  --vision_tower may be omitted and must not name another tower
    a LoRA folder of this project      merged into its base, then trained further (a text-only one:
                                       text-only, and --vision_tower is refused: merge it first)
"""
from __future__ import annotations

import logging
import os

from ..model.builder import assemble_model, load_checkpoint, load_text_model
from ..model.checkpoints import local_folder, read_json, resolve_kind
from ..model.vision import load_vision_config, select_strategy_for_feature, vision_family

logger = logging.getLogger(__name__)

# What makes two towers the same architecture (their weights come from the checkpoint anyway).
_TOWER_FIELDS = ("model_type", "hidden_size", "image_size", "patch_size", "num_hidden_layers")


def is_text_only(model_args, training_args) -> bool:
    """Whether the run trains a language model alone: a causal LM without --vision_tower, or a text-only LoRA
    folder (False when the starting point cannot be read: `starting_point_problems` says why)."""
    path, cache_dir = model_args.model_name_or_path, training_args.cache_dir
    try:
        kind = resolve_kind(path, cache_dir)
        # A text-only adapter stays text-only (--vision_tower is refused); a causal LM takes the tower.
        return kind.text_only(path, cache_dir) and (kind.is_adapter or not model_args.vision_tower)
    except (OSError, ValueError):
        return False


def starting_point_problems(model_args, training_args) -> list[str]:
    """Flag problems that depend on what the starting point is (read from its config, no weights)."""
    try:
        kind = resolve_kind(model_args.model_name_or_path, training_args.cache_dir)
    except (OSError, ValueError) as err:
        return [f"--model_name_or_path {model_args.model_name_or_path}: {err}"]
    problems = []
    if kind.not_a_starting_point:
        problems.append(f"--model_name_or_path {model_args.model_name_or_path} is {kind.not_a_starting_point}")
    text_only = is_text_only(model_args, training_args)
    if text_only and model_args.tune_mm_mlp_adapter:
        problems.append("--tune_mm_mlp_adapter trains a projector, which a text-only run (no --vision_tower) has not")
    if text_only and model_args.pretrain_mm_mlp_adapter:
        problems.append(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}: a text-only run "
                        "(no --vision_tower) has no projector to load it into")
    if kind.brings_projector and model_args.pretrain_mm_mlp_adapter:
        problems.append(f"--pretrain_mm_mlp_adapter: --model_name_or_path {model_args.model_name_or_path} is a "
                        "vision-language model that already has its projector")
    if kind.is_adapter and training_args.bits in (4, 8):
        problems.append(f"--bits {training_args.bits} with a LoRA folder as --model_name_or_path: merge it first "
                        "(python scripts/merge_lora.py --model-path ... --save-path MERGED), then start from MERGED")
    if kind.is_adapter and text_only and model_args.vision_tower:
        problems.append(f"--vision_tower with {model_args.model_name_or_path}, a text-only LoRA folder: merge it "
                        "first (python scripts/merge_lora.py --model-path ... --save-path MERGED), then start from "
                        "MERGED with --vision_tower")
    elif kind.own_tower and model_args.vision_tower:
        problems += _tower_conflict(local_folder(model_args.model_name_or_path, training_args.cache_dir), model_args,
                                    training_args.cache_dir)
    elif model_args.vision_tower:
        problems += _tower_problems(model_args, training_args.cache_dir)[1]
    return problems


def _tower_problems(model_args, cache_dir: str | None) -> tuple[dict, list[str]]:
    """The tower's config, or the flag problem that stops the run (offline, a hub id not in the cache is one)."""
    vision_tower = model_args.vision_tower
    try:
        config = load_vision_config(vision_tower, model_args.trust_remote_code, cache_dir)
        vision_family(config)
    except (OSError, ValueError) as err:
        found = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {}, [f"--vision_tower {vision_tower}: cannot be used ({found}); expected a CLIP or SigLIP vision model "
                    "as a local folder or a hub id (in the hub cache when offline); leave --vision_tower out "
                    '(VISION_TOWER="" in scripts/) for a text-only run']
    return config.to_dict(), []


def _tower_conflict(folder: str, model_args, cache_dir: str | None) -> list[str]:
    vision_tower = model_args.vision_tower
    config = read_json(os.path.join(folder, "config.json"))
    has = config.get("vision_config") or {}
    asked, problems = _tower_problems(model_args, cache_dir)
    if problems:
        return problems
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
    kind = resolve_kind(path, training_args.cache_dir)
    if kind.bare_language_model and model_args.vision_tower is None:
        logger.info("%s is a language model and no --vision_tower was given: text-only fine-tuning", path)
        return load_text_model(path, model_args.version, image_token=False, **options)
    if kind.bare_language_model:
        return assemble_model(path, model_args.vision_tower, mm_projector_type=model_args.mm_projector_type,
                              mm_vision_select_layer=model_args.mm_vision_select_layer,
                              vision_select_strategy=select_strategy_for_feature(model_args.mm_vision_select_feature),
                              version=model_args.version, **options)
    folder = local_folder(path, training_args.cache_dir)
    loaded = load_checkpoint(folder, version=model_args.version, vision_tower=model_args.vision_tower, **options)
    loaded.model.config.mm_base_model = str(path)  # LoRA and projector folders of this run rebuild from it
    if loaded.image_processor is None:
        logger.info("starting from the text-only %s checkpoint %s (merged): text-only fine-tuning", kind, path)
    else:
        logger.info("starting from the %s checkpoint %s: tower, projector (%s) and language model as saved there",
                    kind, path, loaded.model.config.mm_projector_type)
    return loaded
