"""Load any checkpoint a user has, deciding what it is from its files (LLaVA's `load_pretrained_model`).

    full            a LLaVA: stock transformers (llava-hf/*) or this project's full/merged/exported folders
    text            a causal LM (text-only)
    lora            this project's LoRA folder (a VLM or a text model underneath), or LLaVA's own
                    (converted to safetensors): rebuilt from its base, adapter applied
    projector       a stage-1 folder: rebuilt from its base parts, projector loaded
    llava_original  LLaVA's own layout (`llava_original.py`): LLM from its weights, tower from mm_vision_tower

`load_checkpoint` gives the model as training starts from it; `load_pretrained_model` puts it on a
device in eval mode, for inference.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from ..conversation import get_template, prepare_tokenizer
from .assembly import (LoadedModel, _resize_embeddings, assemble_model, attach_vision, build_processor,  # noqa: F401
                       count_parameters, load_text_model, resolve_dtype)
from .checkpoints import (ADAPTER_CONFIG, NON_LORA_FILE, load_non_lora_trainables, load_projector_weights,
                          local_folder, read_config, read_json, resolve_kind, saved_config)
from .llava_original import (is_llava_original, pickled_weights_error, projector_from, projector_state,
                             text_config_dict)
from .modeling import LlavaTinyForCausalLM


# Stock transformers writes LLaVA folders in its older key layout; the renames of its own "llava"
# conversion mapping (keys already in the current layout match none of them).
STOCK_KEY_LAYOUT = {r"^language_model\.model\.": "model.language_model.", r"^language_model\.lm_head\.": "lm_head.",
                    r"^vision_tower\.": "model.vision_tower.", r"^multi_modal_projector\.": "model.multi_modal_projector."}


def load_pretrained_model(model_path: str, model_base: str | None = None, device: str | None = None,
                          dtype: torch.dtype | None = None, merge_lora: bool = True,
                          trust_remote_code: bool = False) -> LoadedModel:
    """Load any checkpoint kind (see the module docstring) on `device`, in eval mode."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_checkpoint(model_path, model_base, dtype=dtype or resolve_dtype(device), merge_lora=merge_lora,
                             trust_remote_code=trust_remote_code)
    loaded.model.to(device).eval()
    return loaded


def load_checkpoint(model_path: str, model_base: str | None = None, dtype: torch.dtype | None = None,
                    merge_lora: bool = True, version: str | None = None, vision_tower: str | None = None,
                    attn_implementation: str | None = None, quantization_config=None,
                    trust_remote_code: bool = False, cache_dir: str | None = None) -> LoadedModel:
    """The model in `model_path` as training starts from it: nothing re-initialised.

    `version` replaces the recorded template; `vision_tower` is LLaVA's-layout tower when its
    config names none (other kinds carry their own tower).
    """
    dtype = dtype or resolve_dtype()
    options = {"dtype": dtype, "attn_implementation": attn_implementation, "quantization_config": quantization_config,
               "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    kind = resolve_kind(model_path, cache_dir)
    if kind != "text":  # a causal LM loads by id through from_pretrained; the other kinds read their folder's files
        model_path = local_folder(model_path, cache_dir)
    if kind == "full":
        loaded = _load_llava(model_path, version, **options)
    elif kind == "text":
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        loaded = load_text_model(model_path, version or getattr(config, "conversation_template", None),
                                 image_token=False, **options)
    elif kind == "llava_original":
        loaded = _load_llava_original(model_path, version, vision_tower, **options)
    else:  # lora, projector: rebuilt from the base they were trained from
        loaded = _load_on_base(kind, model_path, model_base, merge_lora, version, options)
    loaded.kind = kind
    return loaded


def _load_llava(path: str, version: str | None, attn_implementation=None, **options) -> LoadedModel:
    config = read_config(path)
    config.conversation_template = get_template(version).name if version else config.conversation_template
    model = LlavaTinyForCausalLM.from_pretrained(path, config=config, dtype=options["dtype"], key_mapping=STOCK_KEY_LAYOUT,
                                                 quantization_config=options["quantization_config"],
                                                 trust_remote_code=options["trust_remote_code"],
                                                 cache_dir=options["cache_dir"])
    if attn_implementation:
        model.set_attn_implementation({"text_config": attn_implementation})
    hub = {"trust_remote_code": options["trust_remote_code"], "cache_dir": options["cache_dir"]}
    tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    prepare_tokenizer(tokenizer, config.conversation_template)
    _resize_embeddings(model, len(tokenizer))
    # The processor's chat template is rebuilt from the template this model trains and answers with.
    processor = build_processor(AutoImageProcessor.from_pretrained(path, **hub), tokenizer, config,
                                config.conversation_template)
    return LoadedModel(model, tokenizer, processor, "full")


def _load_llava_original(path: str, version: str | None, vision_tower: str | None, **options) -> LoadedModel:
    """LLaVA's layout: the LLM loads from the folder's weights as its base type (the mm_projector keys are
    left out), the tower from `mm_vision_tower`, the projector from the mapped `model.mm_projector.*`."""
    original = read_json(os.path.join(path, "config.json"))
    tower = vision_tower or original.get("mm_vision_tower")
    if not tower:
        raise ValueError(f"{path}: LLaVA's config names no mm_vision_tower; pass --vision_tower")
    text = text_config_dict(original)
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    loaded = load_text_model(path, version or "vicuna_v1", config=config, **options)  # what LLaVA-1.5 trained with
    strategy = "full" if original.get("mm_vision_select_feature") == "cls_patch" else None
    loaded = attach_vision(loaded, tower, original.get("mm_projector_type", "linear"),
                           original.get("mm_vision_select_layer", -2), strategy, llm_path=path,
                           attn_implementation=options["attn_implementation"],
                           trust_remote_code=options["trust_remote_code"], cache_dir=options["cache_dir"])
    projector = loaded.model.model.multi_modal_projector
    projector.load_state_dict({k: v.to(options["dtype"]) for k, v in projector_state(path).items()}, strict=True)
    loaded.model.config.mm_base_model = path
    return loaded


def _load_on_base(kind: str, path: str, model_base: str | None, merge_lora: bool, version: str | None,
                  options: dict) -> LoadedModel:
    config = saved_config(path)  # a text-only LoRA's is base_config.json
    if is_llava_original(config):
        return _load_llava_original_lora(path, config, model_base, version, options)
    if config.get("model_type") not in ("llava", "llava_tiny"):  # a text-only LoRA
        base = model_base or config.get("mm_base_model") or \
            read_json(os.path.join(path, ADAPTER_CONFIG)).get("base_model_name_or_path")
        loaded = load_checkpoint(base, version=version or config.get("conversation_template"), **options)
    else:
        recorded = read_config(path)
        if recorded.mm_base_model and not model_base:
            loaded = load_checkpoint(recorded.mm_base_model, version=version or recorded.conversation_template,
                                     **options)
        else:
            llm, tower = _base_parts(recorded, model_base, path)
            loaded = assemble_model(llm, tower, mm_projector_type=recorded.mm_projector_type,
                                    mm_vision_select_layer=recorded.vision_feature_layer,
                                    vision_select_strategy=recorded.vision_feature_select_strategy,
                                    version=version or recorded.conversation_template, **options)
        loaded.model.config.mm_base_model = recorded.mm_base_model
    if kind == "projector":
        load_projector_weights(loaded.model, path)
        return loaded
    from peft import PeftModel  # the [train] extra

    load_non_lora_trainables(loaded.model, path)
    peft_model = PeftModel.from_pretrained(loaded.model, path)
    loaded.model = peft_model.merge_and_unload() if merge_lora else peft_model
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        loaded.tokenizer = AutoTokenizer.from_pretrained(path)
    return loaded


def _load_llava_original_lora(path: str, original: dict, model_base: str | None, version: str | None,
                              options: dict) -> LoadedModel:
    """LLaVA's own LoRA output: the adapter (on its Llama names) merged into the base LLM, then the tower from
    `mm_vision_tower` and the projector from `non_lora_trainables` attached. Loads merged."""
    from peft import PeftModel

    pickles = [n for n in os.listdir(path) if n.endswith(".bin") and n != "training_args.bin"]
    if pickles:
        raise pickled_weights_error(path, pickles)
    base = model_base or read_json(os.path.join(path, ADAPTER_CONFIG)).get("base_model_name_or_path")
    text = load_text_model(base, version or "vicuna_v1", **options)
    text.model = PeftModel.from_pretrained(text.model, path).merge_and_unload()
    loaded = attach_vision(text, original["mm_vision_tower"], original.get("mm_projector_type", "linear"),
                           original.get("mm_vision_select_layer", -2),
                           "full" if original.get("mm_vision_select_feature") == "cls_patch" else None, llm_path=base,
                           attn_implementation=options["attn_implementation"],
                           trust_remote_code=options["trust_remote_code"], cache_dir=options["cache_dir"])
    projector = projector_from(load_file(os.path.join(path, NON_LORA_FILE)), path)
    loaded.model.model.multi_modal_projector.load_state_dict(
        {k: v.to(options["dtype"]) for k, v in projector.items()}, strict=True)
    return loaded


def _base_parts(config, model_base: str | None, path: str) -> tuple[str, str]:
    llm = model_base or config.mm_llm_path
    tower = config.mm_vision_tower
    missing = [name for name, value in (("language model (--model-base)", llm), ("vision tower", tower)) if not value]
    if missing:
        raise ValueError(f"{path} needs its base parts to load, but {', '.join(missing)} is not known: "
                         "pass --model-base or use a folder saved by this project")
    return llm, tower
