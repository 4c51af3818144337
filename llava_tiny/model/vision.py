"""Vision towers (CLIP, SigLIP): loading, and how many image tokens one image becomes."""
from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

# family -> (model class, has a CLS token that LLaVA's "default" strategy drops)
VISION_FAMILIES = {
    "clip": (CLIPVisionModel, True),
    "siglip": (SiglipVisionModel, False),
}


def vision_family(config) -> str:
    """'clip' or 'siglip' from a (vision or full) config; a clear error for anything else."""
    model_type = getattr(config, "model_type", "")
    for family in VISION_FAMILIES:
        if model_type in (family, f"{family}_vision_model"):
            return family
    raise ValueError(f"unsupported vision tower model_type {model_type!r}; expected a CLIP or SigLIP vision model")


def default_select_strategy(vision_config) -> str:
    """'default' drops CLS (CLIP, LLaVA-1.5's choice); SigLIP has no CLS, so keep everything."""
    return "default" if VISION_FAMILIES[vision_family(vision_config)][1] else "full"


# LLaVA's `mm_vision_select_feature` values -> transformers' `vision_feature_select_strategy`: 'cls_patch'
# keeps CLS ('full'); 'patch' leaves the tower's default (`default_select_strategy`). The one list of the values
# `--mm_vision_select_feature` accepts.
SELECT_FEATURES = {"patch": None, "cls_patch": "full"}


def select_strategy_for_feature(select_feature: str | None) -> str | None:
    """LLaVA's `mm_vision_select_feature` (none: 'patch') as transformers' `vision_feature_select_strategy`."""
    if select_feature not in (None, *SELECT_FEATURES):
        raise ValueError(f"unknown mm_vision_select_feature {select_feature!r}; expected one of "
                         f"{', '.join(SELECT_FEATURES)}")
    return SELECT_FEATURES.get(select_feature)


def num_image_tokens(vision_config, select_strategy: str | None = None) -> int:
    """Placeholders per image: (image_size / patch_size)^2, +1 for CLIP's CLS under 'full'."""
    strategy = select_strategy or default_select_strategy(vision_config)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    has_cls = VISION_FAMILIES[vision_family(vision_config)][1]
    return patches + (1 if has_cls and strategy == "full" else 0)


def load_vision_config(path_or_id: str, trust_remote_code: bool = False, cache_dir: str | None = None):
    config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    return getattr(config, "vision_config", None) or config


def load_vision_tower(path_or_id: str, dtype=None, trust_remote_code: bool = False, cache_dir: str | None = None):
    """Load a CLIP/SigLIP vision model (also from a full CLIP/SigLIP checkpoint) and its image processor."""
    config = load_vision_config(path_or_id, trust_remote_code, cache_dir)
    model_class, _ = VISION_FAMILIES[vision_family(config)]
    tower = model_class.from_pretrained(path_or_id, dtype=dtype, cache_dir=cache_dir)
    image_processor = AutoImageProcessor.from_pretrained(path_or_id, cache_dir=cache_dir)
    return tower, image_processor
