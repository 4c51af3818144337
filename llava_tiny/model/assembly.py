"""Assemble a LLaVA from pretrained parts: a causal LM, a CLIP/SigLIP tower and a fresh projector.

Assembly never builds a second language model: the LLaVA shell is created on the meta device
and the pretrained LLM and vision tower are attached to it (the "ghost model" of many LLaVA
forks is a random LLM left inside the wrapper, 2.8B parameters instead of 1.5B).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaNextProcessor, LlavaProcessor
from transformers.integrations import deepspeed as hf_deepspeed

from ..anyres import anyres_image_processor
from ..conversation import IMAGE_TOKEN, chat_template_jinja, get_template, prepare_tokenizer
from .checkpoints import CheckpointKind, kind_saving, save_checkpoint
from .modeling import LlavaTinyConfig, LlavaTinyForCausalLM
from .projector import build_projector, projector_image_tokens
from .vision import VISION_FAMILIES, default_select_strategy, load_vision_tower, num_image_tokens, vision_family

logger = logging.getLogger(__name__)

_dtype_logged = False


def resolve_dtype(device: str | torch.device | None = None, requested: torch.dtype | None = None) -> torch.dtype:
    """The one dtype policy: fp32 on CPU; bf16 on a GPU that has it, fp16 otherwise. Logged once."""
    global _dtype_logged
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if requested is not None and device.type == "cpu" and requested != torch.float32:
        logger.info("dtype %s requested on CPU: using float32 (CPU kernels for half types are slow)", requested)
        requested = torch.float32
    if requested is None:
        if device.type == "cuda":
            requested = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            requested = torch.float32
    if not _dtype_logged:
        logger.info("model dtype: %s on %s", str(requested).replace("torch.", ""), device.type)
        _dtype_logged = True
    return requested


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters counted once each (tied weights are one parameter); under ZeRO-3 a partitioned parameter is
    empty on this rank and its full size is DeepSpeed's `ds_numel`."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in module.parameters()}.values())


@contextlib.contextmanager
def _gathered(params):
    """Full parameters under ZeRO-3 (partitioned at load), for an edit on rank 0; a no-op otherwise."""
    if hf_deepspeed.is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


@contextlib.contextmanager
def _without_zero3_init():
    """The meta-device shell must not go through ZeRO-3's partitioned init (its parts are replaced)."""
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _resize_embeddings(llm, vocab_size: int) -> None:
    """Grow the LLM's vocabulary for added tokens; new rows are the mean row (deterministic, so a
    LoRA checkpoint rebuilt from the same base gets the same rows)."""
    old = llm.get_input_embeddings().weight.ds_shape[0] if hasattr(llm.get_input_embeddings().weight, "ds_shape") \
        else llm.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    embeddings = {id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}
    with _gathered([m.weight for m in embeddings.values()]), torch.no_grad():
        for emb in embeddings.values():
            emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)


def _processor_patch_size(config: LlavaTinyConfig) -> int:
    """The patch size with which a stock `LlavaProcessor` counts `config.image_seq_length` placeholders: it counts
    (image_size // patch_size)^2 (+ CLS under 'full'), so the tower's own, or k times it for a projector that
    pools k x k patches. Another projector's count it cannot express: said, and the tower's is kept."""
    vision = config.vision_config
    extra = num_image_tokens(vision, config.vision_feature_select_strategy) - (vision.image_size // vision.patch_size) ** 2
    for k in range(1, vision.image_size // vision.patch_size + 1):
        if (vision.image_size // (vision.patch_size * k)) ** 2 + extra == config.image_seq_length:
            return vision.patch_size * k
    logger.warning("mm_projector_type %r gives %d image tokens, a count a stock LlavaProcessor cannot make: the saved "
                   "processor's <image> expansion does not fit this model (llava_tiny's own prompts do)",
                   config.mm_projector_type, config.image_seq_length)
    return vision.patch_size


def build_processor(image_processor, tokenizer, config, template: str):
    """A stock `LlavaProcessor` that expands `<image>` exactly as training does; for a LLaVA-NeXT config (one with
    `image_grid_pinpoints`), a stock `LlavaNextProcessor` that tiles images under the same pinpoints and expands
    each `<image>` to its own image's count."""
    has_cls = VISION_FAMILIES[vision_family(config.vision_config)][1]
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if pinpoints:
        processor_class, image_processor = LlavaNextProcessor, anyres_image_processor(image_processor, pinpoints)
        patch_size = config.vision_config.patch_size
    else:
        processor_class, patch_size = LlavaProcessor, _processor_patch_size(config)
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=chat_template_jinja(template, tokenizer), image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if has_cls else 0)


@dataclass
class LoadedModel:
    """A model with its tokenizer and processor, and the kind of folder it came from (None: assembled from
    parts)."""

    model: LlavaTinyForCausalLM  # or a causal LM (text-only), or a PeftModel around either
    tokenizer: object
    processor: LlavaProcessor
    kind: CheckpointKind | None = None  # set by `checkpoints.load_kind` (checkpoint_kinds.py)

    @property
    def image_processor(self):
        """None for a text-only model (its processor is its tokenizer)."""
        return getattr(self.processor, "image_processor", None)

    @property
    def template(self) -> str:
        return self.model.config.conversation_template

    def save_pretrained(self, save_dir: str) -> None:
        """Save as a full checkpoint (a LoRA checkpoint when the model is an unmerged `PeftModel`)."""
        save_checkpoint(kind_saving(self.model), self.model, self.processor, save_dir)


def assemble_model(model_name_or_path: str, vision_tower: str, mm_projector_type: str = "mlp2x_gelu",
                   mm_vision_select_layer: int = -2, vision_select_strategy: str | None = None,
                   version: str | None = None, dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                   quantization_config=None, trust_remote_code: bool = False,
                   cache_dir: str | None = None) -> LoadedModel:
    """Build a LLaVA from a pretrained causal LM and a pretrained CLIP/SigLIP tower, with no ghost.

    The parameter count equals LLM (after adding `<image>` and template tokens) + tower + projector.
    """
    text = load_text_model(model_name_or_path, version, dtype=dtype, attn_implementation=attn_implementation,
                           quantization_config=quantization_config, trust_remote_code=trust_remote_code,
                           cache_dir=cache_dir)
    return attach_vision(text, vision_tower, mm_projector_type, mm_vision_select_layer, vision_select_strategy,
                         llm_path=model_name_or_path, attn_implementation=attn_implementation,
                         trust_remote_code=trust_remote_code, cache_dir=cache_dir)


def load_text_model(model_name_or_path: str, version: str | None = None, dtype: torch.dtype | None = None,
                    attn_implementation: str | None = None, quantization_config=None, trust_remote_code: bool = False,
                    cache_dir: str | None = None, config=None, image_token: bool = True) -> LoadedModel:
    """A causal LM and its tokenizer, prepared for `version`'s template; with `image_token` False (a text-only
    run) no `<image>` token is added, so the saved model keeps the base vocabulary."""
    dtype = dtype or resolve_dtype()
    hub = {"trust_remote_code": trust_remote_code, "cache_dir": cache_dir}  # for every from_pretrained
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **hub)
    template = get_template(version, tokenizer)  # no version: the tokenizer's own template if usable (logged)
    prepare_tokenizer(tokenizer, template, image_token=image_token)
    llm = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, attn_implementation=attn_implementation,
                                               quantization_config=quantization_config, config=config, **hub)
    _resize_embeddings(llm, len(tokenizer))
    llm.config.conversation_template = template.name  # saved in config.json; stock transformers ignores it
    return LoadedModel(model=llm, tokenizer=tokenizer, processor=tokenizer)


def attach_vision(text: LoadedModel, vision_tower: str, mm_projector_type: str = "mlp2x_gelu",
                  mm_vision_select_layer: int = -2, vision_select_strategy: str | None = None, llm_path: str = "",
                  attn_implementation: str | None = None, trust_remote_code: bool = False,
                  cache_dir: str | None = None) -> LoadedModel:
    """Attach a pretrained tower and a fresh projector to the loaded causal LM `text`, on a meta-device
    LLaVA shell (no second LLM)."""
    llm, tokenizer, dtype = text.model, text.tokenizer, text.model.dtype
    tower, image_processor = load_vision_tower(vision_tower, dtype=dtype, trust_remote_code=trust_remote_code,
                                               cache_dir=cache_dir)
    strategy = vision_select_strategy or default_select_strategy(tower.config)
    image_tokens = projector_image_tokens(mm_projector_type, num_image_tokens(tower.config, strategy))
    template = llm.config.conversation_template
    config = LlavaTinyConfig(
        text_config=llm.config, vision_config=tower.config, mm_projector_type=mm_projector_type,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=image_tokens, vision_feature_layer=mm_vision_select_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        mm_llm_path=str(llm_path), mm_vision_tower=str(vision_tower), conversation_template=template)
    with torch.device("meta"), _without_zero3_init():
        model = LlavaTinyForCausalLM(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.vision_tower = tower
    model.model.multi_modal_projector = build_projector(
        mm_projector_type, tower.config.hidden_size, llm.config.hidden_size).to(dtype)
    if model.config.text_config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.get_input_embeddings().weight
    model.config.dtype = dtype
    if attn_implementation:
        # The LLaVA shell re-resolves its sub-configs to the default; give the LLM what was asked for.
        model.set_attn_implementation({"text_config": attn_implementation})
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"assembly left tensors on the meta device: {leftover[:5]}")
    logger.info("assembled: language model %d + vision tower %d + projector %d = %d parameters (one copy of each)",
                count_parameters(llm), count_parameters(tower), count_parameters(model.model.multi_modal_projector),
                count_parameters(model))
    processor = build_processor(image_processor, tokenizer, config, template)
    return LoadedModel(model=model, tokenizer=tokenizer, processor=processor)
