"""Checkpoint folders: the names of their files, the registry of checkpoint kinds and the one resolver.

A checkpoint kind is a `CheckpointKind`: how to recognise a folder (or hub id) of that kind, save a
live model as one, load one into the live model it was trained from, and load one fresh. The kinds
this project reads and writes (full, llava_next, text, lora, projector, llava_original) are in
`checkpoint_kinds.py`, one class each; a new kind is one more class registered with `register_kind`.
A folder's kind is read from its files, never from its name: `resolve_kind` asks each kind in turn.
Training's starting point and recipes, loading for inference and serving, merging and export all
hold the kind object that `resolve_kind` returns.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import json
import logging
import os

import torch
from safetensors.torch import load_file, save_file

from ..images import processor_for_aspect_ratio
from .llava_original import pickled_weights_error
from .modeling import LlavaTinyConfig
from .projector import projector_image_tokens
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
LLAVA_MODEL_TYPES = ("llava", LlavaTinyConfig.model_type)  # transformers' LLaVA and this project's


def unwrapped_name(name: str) -> str:
    """A parameter's name in the plain model: peft's 'base_model.model.' and '.base_layer' removed."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_llava_config(config: dict) -> bool:
    """A config.json of transformers' LLaVA layout (stock `llava` or this project's `llava_tiny`)."""
    return config.get("model_type") in LLAVA_MODEL_TYPES


def saved_config(path: str) -> dict:
    """The folder's config: config.json, a text-only LoRA's base_config.json, or {} (a stock PEFT folder)."""
    for name in ("config.json", BASE_CONFIG_FILE):
        if os.path.isfile(os.path.join(path, name)):
            return read_json(os.path.join(path, name))
    return {}


def local_folder(path_or_id: str, cache_dir: str | None = None) -> str:
    """A local folder for `path_or_id`: itself, or the hub snapshot (from the cache when offline)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_id, cache_dir=cache_dir, allow_patterns=[
        "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.bin"])


@dataclasses.dataclass
class Found:
    """What a folder or hub id shows of itself: its file names (a hub id: the adapter config, if any, and
    config.json), its config.json ({} if none), and whether it holds model weights."""

    where: str
    files: set[str]
    config: dict
    has_weights: bool

    @classmethod
    def at(cls, path_or_id: str, cache_dir: str | None = None) -> Found:
        if os.path.isdir(path_or_id):
            files = set(os.listdir(path_or_id))
            config = read_json(os.path.join(path_or_id, "config.json")) if "config.json" in files else {}
            weights = any(f in files for f in MODEL_FILES) or any(
                f.startswith("model-") and f.endswith(".safetensors") for f in files)
            return cls(path_or_id, files, config, weights)
        from transformers.utils import cached_file  # a hub id: its config.json decides (read from the cache offline)

        adapter = cached_file(path_or_id, ADAPTER_CONFIG, cache_dir=cache_dir,
                              _raise_exceptions_for_missing_entries=False)
        config = cached_file(path_or_id, "config.json", cache_dir=cache_dir,
                             _raise_exceptions_for_missing_entries=not adapter)  # a stock PEFT repo may have none
        files = {name for name, file in ((ADAPTER_CONFIG, adapter), ("config.json", config)) if file}
        return cls(path_or_id, files, read_json(config) if config else {}, True)  # weights: fetched when it loads


@dataclasses.dataclass
class LoadOptions:
    """How a checkpoint is loaded fresh (see `builder.load_checkpoint`)."""

    dtype: torch.dtype
    attn_implementation: str | None = None
    quantization_config: object = None
    trust_remote_code: bool = False
    cache_dir: str | None = None
    model_base: str | None = None  # the language model a LoRA or projector folder is rebuilt on
    merge_lora: bool = True
    version: str | None = None  # replaces the recorded template
    vision_tower: str | None = None  # LLaVA's-layout tower when its config names none

    @property
    def hub(self) -> dict:
        return {"trust_remote_code": self.trust_remote_code, "cache_dir": self.cache_dir}

    @property
    def model(self) -> dict:
        """The keyword arguments of `assembly.load_text_model` / `assemble_model`."""
        return {"dtype": self.dtype, "attn_implementation": self.attn_implementation,
                "quantization_config": self.quantization_config, **self.hub}

    def for_base(self, version: str | None) -> LoadOptions:
        """The options a LoRA or projector folder's base loads with: merged, with `version` (or the asked one)."""
        return dataclasses.replace(self, model_base=None, merge_lora=True, vision_tower=None,
                                   version=self.version or version)


class CheckpointKind(abc.ABC):
    """One layout of a checkpoint folder. Subclass, set the attributes, implement what the kind does, and
    register an instance with `register_kind`; everything that saves, loads or checks a starting point
    asks the kind object."""

    name = ""
    order = 100  # asked in ascending order; the first kind that recognises a folder names its kind
    expects = ""  # what its folder holds, for the refusal of a folder no kind recognises
    reads_folder = True  # loads from a local folder (a hub id is downloaded first); False: by id
    saves_all_weights = False  # a save writes every weight (else only the trained ones)
    is_adapter = False  # LoRA-like: merged into its base, not quantized at start
    brings_projector = False  # a starting point of this kind has its projector (no --pretrain_mm_mlp_adapter)
    own_tower = False  # carries its tower's config: --vision_tower may only name the same architecture
    bare_language_model = False  # a causal LM: a run starting from it assembles a LLaVA when given a tower
    not_a_starting_point = ""  # why a run cannot start from it ('' when it can)

    @abc.abstractmethod
    def recognise(self, found: Found) -> bool:
        """Whether `found` is a checkpoint of this kind."""

    def saves_live(self, model) -> bool:
        """Whether `LoadedModel.save_pretrained` writes `model` as this kind."""
        return False

    def text_only(self, path_or_id: str, cache_dir: str | None = None) -> bool:
        """Whether a checkpoint of this kind holds a language model alone (no tower, no projector)."""
        return False

    def save(self, model, processor, output_dir: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Write `model` (its tensors in `state_dict`, on the CPU) into the existing folder `output_dir`."""
        raise ValueError(f"{self.name} checkpoints are read, never written")

    def load_into(self, model, folder: str) -> None:
        """Load a checkpoint of this kind into the live model it was trained from (resume, best model)."""
        raise ValueError(f"{self.name} checkpoints are not loaded into a live model")

    @abc.abstractmethod
    def load(self, folder: str, options: LoadOptions):
        """The `LoadedModel` in `folder` (a local folder, or the id itself when not `reads_folder`)."""

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{self.name} checkpoint kind>"

    # A kind equals its name: `LoadedModel.kind` was the name, and scripts comparing it keep working.
    def __eq__(self, other) -> bool:
        return other == self.name if isinstance(other, str) else other is self

    def __hash__(self) -> int:
        return hash(self.name)


KINDS: dict[str, CheckpointKind] = {}


def register_kind(kind: CheckpointKind) -> CheckpointKind:
    """Make `kind` known to the resolver (and to `LoadedModel.save_pretrained`); returns it."""
    KINDS[kind.name] = kind
    return kind


def _kinds() -> list[CheckpointKind]:
    return sorted(KINDS.values(), key=lambda kind: kind.order)


def resolve_kind(path_or_id: str, cache_dir: str | None = None) -> CheckpointKind:
    """The kind of a local folder or a hub id (its files read from the hub cache when offline): the one
    resolver for training's starting point, loading for inference and serving, and export. Pickle-only
    folders are refused with the command that converts them; anything else with what was found and what
    was expected."""
    found = Found.at(path_or_id, cache_dir)
    kind = next((kind for kind in _kinds() if kind.recognise(found)), None)
    if kind is not None:
        return kind
    expected = [kind.expects for kind in _kinds() if kind.expects]
    expected = ", ".join(expected[:-1]) + (" or " if len(expected) > 1 else "") + expected[-1]
    if found.has_weights:
        raise ValueError(f"{path_or_id}: a {found.config.get('model_type')!r} model that no checkpoint kind reads; "
                         f"expected {expected}")
    pickles = [f for f in found.files if f.startswith("pytorch_model") and f.endswith(".bin")]
    if pickles:
        raise pickled_weights_error(path_or_id, pickles)
    raise FileNotFoundError(f"{path_or_id} holds no model: expected {expected}; "
                            f"found {sorted(found.files) or 'nothing'}")


def load_kind(path_or_id: str, options: LoadOptions):
    """The checkpoint at `path_or_id` loaded fresh by its kind, the `LoadedModel` stamped with that kind."""
    kind = resolve_kind(path_or_id, options.cache_dir)
    loaded = kind.load(local_folder(path_or_id, options.cache_dir) if kind.reads_folder else path_or_id, options)
    loaded.kind = kind
    return loaded


def save_checkpoint(kind: CheckpointKind, model, processor, output_dir: str, state_dict: dict | None = None) -> None:
    """Write `model` as a checkpoint of `kind` into `output_dir` (made if missing).

    `model` is the unwrapped LLaVA (a `PeftModel` for LoRA); `state_dict` holds tensors the caller
    gathered (ZeRO-3), else the model's own are used.
    """
    os.makedirs(output_dir, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    kind.save(model, processor, output_dir, {k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def kind_saving(model) -> CheckpointKind:
    """The kind a live model is saved as when no recipe says (a full checkpoint; LoRA for an unmerged PeftModel)."""
    kind = next((kind for kind in _kinds() if kind.saves_live(model)), None)
    if kind is None:
        raise ValueError(f"no checkpoint kind saves a {type(model).__name__} (known: {', '.join(KINDS)})")
    return kind


def read_config(path: str) -> LlavaTinyConfig:
    """The checkpoint's config as a `LlavaTinyConfig` (stock `llava` folders included)."""
    data = read_json(os.path.join(path, "config.json"))
    data.pop("model_type", None)
    data.pop("architectures", None)
    config = LlavaTinyConfig.from_dict(data)
    # Counted from the tower, as stock transformers' processor does: a stock LlavaConfig built around another
    # tower keeps the default 576 (written right on save).
    counted = projector_image_tokens(config.mm_projector_type,
                                     num_image_tokens(config.vision_config, config.vision_feature_select_strategy))
    if config.image_seq_length != counted:
        vision = config.vision_config
        logger.warning("%s: config.json says image_seq_length %s, but its vision tower (%d px images, %d px patches, "
                       "%r features) gives %d tokens per image: using %d", path, config.image_seq_length,
                       vision.image_size, vision.patch_size, config.vision_feature_select_strategy, counted, counted)
        config.image_seq_length = counted
    return config


def check_not_empty(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Refuse to save empty tensors: under ZeRO-3 an empty tensor is a partitioned parameter that was not
    gathered, and saving it would write a checkpoint that cannot be loaded."""
    empty = [k for k, v in state_dict.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save {where}: {len(empty)} empty tensors (ZeRO-3 partitions not gathered), "
                           f"e.g. {empty[:3]}; set stage3_gather_16bit_weights_on_model_save in the ZeRO config")


def save_tensors(state: dict[str, torch.Tensor], path: str) -> None:
    save_file(state, path, metadata={"format": "pt"})


def save_config_and_processor(config, processor, output_dir: str) -> None:
    """config.json and the processor (as stock readers should use it) beside the weights."""
    config.save_pretrained(output_dir)
    processor_for_stock_readers(processor, config).save_pretrained(output_dir)


def processor_for_stock_readers(processor, config):
    """`processor` with the image processor that prepares images as training did (`image_aspect_ratio`), so
    `AutoProcessor.from_pretrained(folder)` (transformers, lmms-eval, vLLM, SGLang) feeds the model what it
    was trained on. Transparent pixels are the one thing stock processors cannot follow: they composite
    onto white, so a model trained with `--image_background mean` is said to differ there."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(config, "vision_config", None) is None:
        return processor  # a text-only model: its processor is its tokenizer
    if getattr(config, "image_grid_pinpoints", None):
        return processor  # anyres: a stock LlavaNextProcessor under the config's pinpoints (assembly.build_processor)
    if getattr(config, "image_background", "white") != "white":
        logger.warning("trained with --image_background %s: stock readers of this folder (transformers, vLLM, "
                       "SGLang, lmms-eval) composite transparent pixels onto white; this project's own loaders "
                       "read image_background from config.json", config.image_background)
    stock = copy.copy(processor)
    stock.image_processor = processor_for_aspect_ratio(image_processor, getattr(config, "image_aspect_ratio", "pad"))
    return stock


def load_projector_weights(model, path: str) -> None:
    """Load a stage-1 projector (`mm_projector.safetensors` or its folder) into `model`."""
    file = os.path.join(path, PROJECTOR_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no projector weights at {file}; expected a stage-1 folder holding {PROJECTOR_FILE}")
    state = {k.removeprefix(PROJECTOR_PREFIX): v for k, v in load_file(file).items()}
    projector = model.model.multi_modal_projector
    dtype = next(iter(projector.parameters())).dtype if list(projector.parameters()) else None
    projector.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
