"""The checkpoint kinds this project reads and writes, one class each (the registry, the resolver and
the file names are in `checkpoints.py`):

    full            model.safetensors (or shards) + config.json + tokenizer/processor (stock
                    `LlavaForConditionalGeneration` loads it when the projector is mlp2x_gelu); stock
                    transformers' (llava-hf/*) and this project's full, merged and exported folders
    lora            adapter_config.json + adapter_model.safetensors (peft) + non_lora_trainables.safetensors
                    (every other trained weight: the projector, the tower when tuned) + config.json + processor;
                    a text-only LoRA keeps its base config as base_config.json instead (a stock PEFT folder:
                    `AutoModelForCausalLM.from_pretrained(folder)` loads it). Rebuilt from its base, adapter
                    applied; LLaVA's own LoRA output (converted to safetensors) too
    llava_original  read only: LLaVA's own layout (`llava_original.py`): the LLM from its weights, the tower
                    from mm_vision_tower
    text            read only: a causal LM (text-only runs save it as `full`, written as a stock LM folder)
    projector       mm_projector.safetensors (stage 1) + config.json (recording the base parts) + processor;
                    rebuilt from its base parts, projector loaded

A new kind is one more `CheckpointKind` subclass with an instance passed to `register_kind`, here or in
any module imported before the folder is loaded; `tests/test_checkpoint_kinds.py` adds one that way.
"""
from __future__ import annotations

import json
import os

from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from ..conversation import get_template, prepare_tokenizer
from .assembly import LoadedModel, _resize_embeddings, assemble_model, attach_vision, build_processor, load_text_model
from .checkpoints import (ADAPTER_CONFIG, ADAPTER_FILE, BASE_CONFIG_FILE, MODEL_FILES, NON_LORA_FILE, PROJECTOR_FILE,
                          PROJECTOR_PREFIX, CheckpointKind, Found, LoadOptions, check_not_empty, is_llava_config,
                          load_kind, load_projector_weights, local_folder, read_config, read_json, register_kind,
                          save_config_and_processor, save_tensors, saved_config, unwrapped_name)
from .llava_original import (LLAVA_ORIGINAL_TYPES, is_llava_original, pickled_weights_error, projector_from,
                             projector_state, text_config_dict)
from .modeling import LlavaTinyForCausalLM
from .modeling_next import LlavaTinyNextConfig, LlavaTinyNextForCausalLM, is_next
from .vision import select_strategy_for_feature

# Stock transformers writes LLaVA folders in its older key layout; the renames of its own "llava"
# conversion mapping (keys already in the current layout match none of them).
STOCK_KEY_LAYOUT = {r"^language_model\.model\.": "model.language_model.", r"^language_model\.lm_head\.": "lm_head.",
                    r"^vision_tower\.": "model.vision_tower.",
                    r"^multi_modal_projector\.": "model.multi_modal_projector."}


def _is_peft(model) -> bool:
    return hasattr(model, "get_base_model")


class FullCheckpoint(CheckpointKind):
    name, order = "full", 10
    expects = f"{MODEL_FILES[0]} + a LLaVA config.json (full model)"
    saves_all_weights = brings_projector = own_tower = True
    model_class, key_layout = LlavaTinyForCausalLM, STOCK_KEY_LAYOUT  # what loads it, from which key names

    def recognise(self, found: Found) -> bool:
        # A LoRA run saved over a full one leaves model.safetensors beside the adapter: the folder is the LoRA.
        return found.has_weights and is_llava_config(found.config) and ADAPTER_CONFIG not in found.files

    def saves_live(self, model) -> bool:
        return not _is_peft(model)

    def save(self, model, processor, output_dir, state_dict) -> None:
        check_not_empty(state_dict, output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        save_config_and_processor(model.config, processor, output_dir)

    def load_into(self, model, folder: str) -> None:
        _, unexpected = model.load_state_dict(load_file(os.path.join(folder, MODEL_FILES[0])), strict=False)
        if unexpected:
            raise ValueError(f"{folder}: weights the model does not have: {unexpected[:5]}")

    def read_config(self, folder: str):
        """The folder's config.json as the config of `model_class`."""
        return read_config(folder)

    def load(self, folder: str, options: LoadOptions) -> LoadedModel:
        config = self.read_config(folder)
        config.conversation_template = get_template(options.version).name if options.version \
            else config.conversation_template
        model = self.model_class.from_pretrained(folder, config=config, dtype=options.dtype, key_mapping=self.key_layout,
                                                 quantization_config=options.quantization_config, **options.hub)
        if options.attn_implementation:
            model.set_attn_implementation({"text_config": options.attn_implementation})
        tokenizer = AutoTokenizer.from_pretrained(folder, **options.hub)
        prepare_tokenizer(tokenizer, config.conversation_template)
        _resize_embeddings(model, len(tokenizer))
        # The processor's chat template is rebuilt from the template this model trains and answers with.
        processor = build_processor(AutoImageProcessor.from_pretrained(folder, **options.hub), tokenizer, config,
                                    config.conversation_template)
        return LoadedModel(model, tokenizer, processor, self)


# LLaVA-NeXT's: the same renames, and the image_newline at the top.
NEXT_KEY_LAYOUT = {**STOCK_KEY_LAYOUT, r"^image_newline": "model.image_newline"}
NEXT_MODEL_TYPES = ("llava_next", LlavaTinyNextConfig.model_type)  # transformers' LLaVA-NeXT and this project's


class LlavaNextCheckpoint(FullCheckpoint):
    """A full LLaVA-NeXT ("anyres") model: stock `llava_next` (or `llava_tiny_next` for other projectors) with a
    `LlavaNextProcessor` tiling under the config's `image_grid_pinpoints`. Saved, loaded into a live model and
    loaded fresh as a full checkpoint (the inherited methods), as its own model class."""

    name, order = "llava_next", 5  # before `full`, which saves any plain model
    expects = f"{MODEL_FILES[0]} + a LLaVA-NeXT config.json (anyres)"
    model_class, key_layout = LlavaTinyNextForCausalLM, NEXT_KEY_LAYOUT

    def recognise(self, found: Found) -> bool:
        return found.has_weights and found.config.get("model_type") in NEXT_MODEL_TYPES \
            and ADAPTER_CONFIG not in found.files

    def saves_live(self, model) -> bool:
        return not _is_peft(model) and is_next(model)

    def read_config(self, folder: str) -> LlavaTinyNextConfig:
        data = read_json(os.path.join(folder, "config.json"))
        return LlavaTinyNextConfig.from_dict({k: v for k, v in data.items() if k not in ("model_type", "architectures")})


def is_text_lora(folder: str) -> bool:
    """Whether the LoRA folder adapts a language model alone (no tower, no projector)."""
    config = saved_config(folder)
    return not is_llava_config(config) and not is_llava_original(config)


def _load_base(folder: str, options: LoadOptions) -> LoadedModel:
    """What a LoRA or projector folder of this project was trained from: the checkpoint it started from
    (`mm_base_model`), the language model (`--model-base`, else the recorded one) and tower assembled, or a
    text-only LoRA's base language model."""
    config = saved_config(folder)  # a text-only LoRA's is base_config.json
    if not is_llava_config(config):  # a text-only LoRA
        base = options.model_base or config.get("mm_base_model") or \
            read_json(os.path.join(folder, ADAPTER_CONFIG)).get("base_model_name_or_path")
        return load_kind(base, options.for_base(config.get("conversation_template")))
    recorded = read_config(folder)
    if recorded.mm_base_model and not options.model_base:
        loaded = load_kind(recorded.mm_base_model, options.for_base(recorded.conversation_template))
    else:
        llm, tower = options.model_base or recorded.mm_llm_path, recorded.mm_vision_tower
        missing = [name for name, value in (("language model (--model-base)", llm), ("vision tower", tower))
                   if not value]
        if missing:
            raise ValueError(f"{folder} needs its base parts to load, but {', '.join(missing)} is not known: "
                             "pass --model-base or use a folder saved by this project")
        loaded = assemble_model(llm, tower, mm_projector_type=recorded.mm_projector_type,
                                mm_vision_select_layer=recorded.vision_feature_layer,
                                vision_select_strategy=recorded.vision_feature_select_strategy,
                                version=options.version or recorded.conversation_template, **options.model)
    loaded.model.config.mm_base_model = recorded.mm_base_model
    return loaded


def _load_non_lora_trainables(model, folder: str) -> None:
    """Load a LoRA folder's non-adapter weights (projector, tuned tower) into the plain `model`."""
    path = os.path.join(folder, NON_LORA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is a LoRA checkpoint without {NON_LORA_FILE} "
                                "(the projector and other non-LoRA trainables)")
    _, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected:
        raise ValueError(f"{path} holds weights the model does not have: {unexpected[:5]}")


class LoraCheckpoint(CheckpointKind):
    name, order = "lora", 20
    expects = f"{ADAPTER_CONFIG} + adapter weights (LoRA)"
    is_adapter = brings_projector = own_tower = True

    def recognise(self, found: Found) -> bool:
        return ADAPTER_CONFIG in found.files

    def saves_live(self, model) -> bool:
        return _is_peft(model)

    def text_only(self, path_or_id: str, cache_dir: str | None = None) -> bool:
        return is_text_lora(local_folder(path_or_id, cache_dir))

    def save(self, model, processor, output_dir, state_dict) -> None:
        trainable = {unwrapped_name(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        non_lora = {k: v for k, v in ((unwrapped_name(k), v) for k, v in state_dict.items() if "lora_" not in k)
                    if k in trainable}
        check_not_empty(non_lora, output_dir)
        check_not_empty({k: v for k, v in state_dict.items() if "lora_" in k}, output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        save_tensors(non_lora, os.path.join(output_dir, NON_LORA_FILE))
        base = model.get_base_model()
        if getattr(base.config, "vision_config", None) is not None:
            save_config_and_processor(base.config, processor, output_dir)
            return
        # A text-only LoRA folder stays a stock PEFT folder: the base config under BASE_CONFIG_FILE, and the
        # adapter's base is the folder the run started from when that was a checkpoint (a LoRA folder merged
        # at start): the adapter applies to it, not to the original base peft records.
        base.config.to_json_file(os.path.join(output_dir, BASE_CONFIG_FILE), use_diff=True)
        processor.save_pretrained(output_dir)
        started_from = getattr(base.config, "mm_base_model", None)
        if started_from:
            adapter_config = read_json(os.path.join(output_dir, ADAPTER_CONFIG))
            adapter_config["base_model_name_or_path"] = started_from
            with open(os.path.join(output_dir, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
                json.dump(adapter_config, f, indent=2, sort_keys=True)

    def load_into(self, model, folder: str) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(os.path.join(folder, ADAPTER_FILE)))
        _load_non_lora_trainables(model.get_base_model(), folder)

    def load(self, folder: str, options: LoadOptions) -> LoadedModel:
        from peft import PeftModel  # the [train] extra

        if is_llava_original(saved_config(folder)):
            return _load_llava_original_lora(folder, options)
        loaded = _load_base(folder, options)
        _load_non_lora_trainables(loaded.model, folder)
        peft_model = PeftModel.from_pretrained(loaded.model, folder)
        loaded.model = peft_model.merge_and_unload() if options.merge_lora else peft_model
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            loaded.tokenizer = AutoTokenizer.from_pretrained(folder)
        return loaded


def _attach_original_vision(text: LoadedModel, original: dict, tower: str, llm_path: str,
                            options: LoadOptions) -> LoadedModel:
    """The tower and projector type a LLaVA-layout config names, attached to its language model."""
    return attach_vision(text, tower, original.get("mm_projector_type", "linear"),
                         original.get("mm_vision_select_layer", -2),
                         select_strategy_for_feature(original.get("mm_vision_select_feature")), llm_path=llm_path,
                         attn_implementation=options.attn_implementation, **options.hub)


def _load_llava_original_lora(folder: str, options: LoadOptions) -> LoadedModel:
    """LLaVA's own LoRA output: the adapter (on its Llama names) merged into the base LLM, then the tower from
    `mm_vision_tower` and the projector from `non_lora_trainables` attached. Loads merged."""
    from peft import PeftModel

    pickles = [n for n in os.listdir(folder) if n.endswith(".bin") and n != "training_args.bin"]
    if pickles:
        raise pickled_weights_error(folder, pickles)
    original = saved_config(folder)
    base = options.model_base or read_json(os.path.join(folder, ADAPTER_CONFIG)).get("base_model_name_or_path")
    text = load_text_model(base, options.version or "vicuna_v1", **options.model)
    text.model = PeftModel.from_pretrained(text.model, folder).merge_and_unload()
    loaded = _attach_original_vision(text, original, original["mm_vision_tower"], base, options)
    projector = projector_from(load_file(os.path.join(folder, NON_LORA_FILE)), folder)
    loaded.model.model.multi_modal_projector.load_state_dict(
        {k: v.to(options.dtype) for k, v in projector.items()}, strict=True)
    return loaded


class LlavaOriginalCheckpoint(CheckpointKind):
    name, order = "llava_original", 30
    expects = f"LLaVA's own config.json (model_type {', '.join(LLAVA_ORIGINAL_TYPES)})"
    brings_projector = True

    def recognise(self, found: Found) -> bool:
        return is_llava_original(found.config)

    def load(self, folder: str, options: LoadOptions) -> LoadedModel:
        """The LLM loads from the folder's weights as its base type (the mm_projector keys are left out), the
        tower from `mm_vision_tower`, the projector from the mapped `model.mm_projector.*`."""
        original = read_json(os.path.join(folder, "config.json"))
        tower = options.vision_tower or original.get("mm_vision_tower")
        if not tower:
            raise ValueError(f"{folder}: LLaVA's config names no mm_vision_tower; pass --vision_tower")
        text = text_config_dict(original)
        config = AutoConfig.for_model(text.pop("model_type"), **text)
        # vicuna_v1: what LLaVA-1.5 trained with
        loaded = load_text_model(folder, options.version or "vicuna_v1", config=config, **options.model)
        loaded = _attach_original_vision(loaded, original, tower, folder, options)
        projector = loaded.model.model.multi_modal_projector
        projector.load_state_dict({k: v.to(options.dtype) for k, v in projector_state(folder).items()}, strict=True)
        loaded.model.config.mm_base_model = folder
        return loaded


class TextCheckpoint(CheckpointKind):
    name, order = "text", 40
    expects = f"{MODEL_FILES[0]} + a causal language model's config.json (text-only)"
    reads_folder = False  # a causal LM loads by id through from_pretrained
    bare_language_model = True

    def recognise(self, found: Found) -> bool:
        return found.has_weights and "vision_config" not in found.config

    def text_only(self, path_or_id: str, cache_dir: str | None = None) -> bool:
        return True

    def load(self, folder: str, options: LoadOptions) -> LoadedModel:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
        return load_text_model(folder, options.version or getattr(config, "conversation_template", None),
                               image_token=False, **options.model)


class ProjectorCheckpoint(CheckpointKind):
    name, order = "projector", 50
    expects = f"{PROJECTOR_FILE} (stage-1 projector)"
    not_a_starting_point = ("a stage-1 projector folder: pass it as --pretrain_mm_mlp_adapter, with the language "
                            "model as --model_name_or_path")

    def recognise(self, found: Found) -> bool:
        return PROJECTOR_FILE in found.files

    def save(self, model, processor, output_dir, state_dict) -> None:
        projector = {k: v for k, v in ((unwrapped_name(k), v) for k, v in state_dict.items())
                     if k.startswith(PROJECTOR_PREFIX)}
        check_not_empty(projector, output_dir)
        save_tensors(projector, os.path.join(output_dir, PROJECTOR_FILE))
        save_config_and_processor(model.config, processor, output_dir)

    def load_into(self, model, folder: str) -> None:
        load_projector_weights(model, folder)

    def load(self, folder: str, options: LoadOptions) -> LoadedModel:
        loaded = _load_base(folder, options)
        load_projector_weights(loaded.model, folder)
        return loaded


FULL = register_kind(FullCheckpoint())
LLAVA_NEXT = register_kind(LlavaNextCheckpoint())
LORA = register_kind(LoraCheckpoint())
LLAVA_ORIGINAL = register_kind(LlavaOriginalCheckpoint())
TEXT = register_kind(TextCheckpoint())
PROJECTOR = register_kind(ProjectorCheckpoint())
