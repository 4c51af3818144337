"""Training recipes: what trains, with which learning rate, and which checkpoint the run writes.

    projector  stage 1 (--tune_mm_mlp_adapter): the projector only           -> projector checkpoint
    full       the LLM (unless --freeze_backbone) + projector (+ tower)       -> full checkpoint
    lora       LoRA adapters on the LLM + projector (+ tower)                 -> LoRA checkpoint
    qlora      `lora` on a 4- or 8-bit quantized LLM (--bits 4|8)             -> LoRA checkpoint

The projector trains unless --freeze_mm_mlp_adapter; the tower only with --unfreeze_mm_vision_tower
(not in stage 1). A recipe is the only place that decides what is frozen. Add one: a `Recipe`
subclass with `@register("name")` and its `selected_by` rule (the flags that ask for it); `make_recipe`
asks every registered recipe, and a subclass whose rule narrows its parent's wins over it.
"""
from __future__ import annotations

import abc
import logging

import torch
from transformers.trainer_pt_utils import get_parameter_names

from ..model import checkpoint_kinds
from ..model.checkpoints import CheckpointKind, kind_saving, save_checkpoint
from ..model.modeling import unwrap_model

logger = logging.getLogger(__name__)

FROZEN, FULL, LORA = "frozen", "full", "lora"
RECIPES: dict[str, type[Recipe]] = {}


def register(name: str):
    """Class decorator: make the recipe available as `name`."""
    def add(cls):
        cls.name = name
        RECIPES[name] = cls
        return cls
    return add


def make_recipe(model_args, training_args) -> Recipe:
    """The registered recipe whose `selected_by` accepts the flags; where several do, the one that is a subclass
    of all the others (QLoRA is LoRA on a quantized model). Flag combinations were checked in `arguments.parse_args`."""
    accepting = [recipe for recipe in RECIPES.values() if recipe.selected_by(model_args, training_args)]
    chosen = [recipe for recipe in accepting if all(issubclass(recipe, other) for other in accepting)]
    if len(chosen) != 1:  # rules that overlap without one recipe refining the other: a recipe to fix, not a flag
        raise ValueError(f"the flags select {len(accepting)} training recipes ({', '.join(r.name for r in accepting)}) "
                         "and none refines the others; a recipe's selected_by must exclude the others' flags, or "
                         "the recipe must subclass the one it refines")
    return chosen[0](model_args, training_args)


def _parts(model) -> dict[str, list[torch.nn.Module]]:
    """The model's parts; a text-only model is all language model."""
    llava = unwrap_model(model)
    if not hasattr(getattr(llava, "model", None), "vision_tower"):
        return {"language_model": [llava]}
    # LLaVA-NeXT's image_newline (a parameter, frozen and unfrozen as modules are) trains with the projector.
    newline = [llava.model.image_newline] if hasattr(llava.model, "image_newline") else []
    return {"language_model": [llava.model.language_model, llava.lm_head],
            "vision_tower": [llava.model.vision_tower], "projector": [llava.model.multi_modal_projector, *newline]}


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO-3 a partitioned parameter is empty on this rank and its full
    size is DeepSpeed's `ds_numel`."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, _ in sizes)


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors (each storage counted once: tied weights are saved once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


class Recipe(abc.ABC):
    """One way to train: a tuning per part ('frozen' / 'full' / 'lora') and the checkpoint kind it saves."""

    name = ""
    checkpoint_kind: CheckpointKind = checkpoint_kinds.FULL

    def __init__(self, model_args, training_args):
        self.model_args, self.training_args = model_args, training_args

    @staticmethod
    @abc.abstractmethod
    def selected_by(model_args, training_args) -> bool:
        """Whether the flags ask for this recipe (a subclass's rule may narrow its parent's: it is then preferred)."""

    def tuning(self) -> dict[str, str]:
        """Part ('language_model', 'vision_tower', 'projector') -> FROZEN, FULL or LORA."""
        llm = FULL if not self.model_args.freeze_backbone else FROZEN
        return {"language_model": llm, "projector": FROZEN if self.training_args.freeze_mm_mlp_adapter else FULL,
                "vision_tower": FULL if self.model_args.unfreeze_mm_vision_tower else FROZEN}

    def quantization_config(self, dtype: torch.dtype):
        """How the LLM is loaded (QLoRA quantizes it); None: as it is."""
        return None

    def prepare(self, model):
        """Freeze and unfreeze each part, add LoRA adapters where asked; return the model to train."""
        if self.checkpoint_kind is checkpoint_kinds.FULL:
            self.checkpoint_kind = kind_saving(model)  # a LLaVA-NeXT model saves as a llava_next folder
        parts = _parts(model)
        tuning = {part: how for part, how in self.tuning().items() if part in parts}
        model.requires_grad_(False)
        for part, modules in parts.items():
            for module in modules:
                module.requires_grad_(tuning[part] == FULL)
        if LORA in tuning.values():
            model = self._add_adapters(model)
        trainable, total = parameter_counts(model)
        logger.info("recipe %s (%s): %d of %d parameters trainable (%.2f%%)", self.name,
                    ", ".join(f"{part} {how}" for part, how in tuning.items()), trainable, total,
                    100 * trainable / max(total, 1))
        return model

    def _add_adapters(self, model):
        from ..model.lora import apply_lora

        args = self.training_args
        return apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, bias=args.lora_bias,
                          target_modules=args.lora_target_modules)

    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        """Optimizer groups: the projector (--mm_projector_lr) and the tower (--mm_vision_tower_lr) get
        their own learning rate (LLaVA's); no weight decay on biases, norms and embeddings."""
        args = self.training_args
        decay = set(get_parameter_names(model, [torch.nn.LayerNorm, torch.nn.Embedding]))
        decay = {n for n in decay if "bias" not in n and "norm" not in n}
        own_rate = {"multi_modal_projector": args.mm_projector_lr, "image_newline": args.mm_projector_lr,
                    "vision_tower": args.mm_vision_tower_lr}
        groups: dict[tuple, dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            part = next((key for key, lr in own_rate.items() if lr is not None and key in name), None)
            wd = weight_decay if name in decay else 0.0
            group = groups.setdefault((part, wd), {"params": [], "weight_decay": wd,
                                                   "lr": own_rate[part] if part else args.learning_rate})
            group["params"].append(param)
        return list(groups.values())

    def save(self, model, processor, output_dir: str, state_dict: dict | None = None) -> None:
        """Write this recipe's checkpoint of `model` (unwrapped from DeepSpeed/DDP; a PeftModel for LoRA)."""
        save_checkpoint(self.checkpoint_kind, model, processor, output_dir, state_dict=state_dict)

    def load(self, model, checkpoint_dir: str) -> None:
        """Load a checkpoint this recipe saved into the live training model (resume without DeepSpeed)."""
        self.checkpoint_kind.load_into(model, checkpoint_dir)

    def bytes_needed(self, model, optimizer=None) -> int:
        """About what a save writes: the weights (all for a full checkpoint, the trained ones otherwise),
        plus the optimizer state when given (a resumable checkpoint)."""
        params = model.parameters() if self.checkpoint_kind.saves_all_weights else (
            p for p in model.parameters() if p.requires_grad)
        total = tensor_bytes(params)
        states = getattr(optimizer, "state", {}).values() if optimizer is not None else ()
        return total + tensor_bytes(t for state in states if isinstance(state, dict) for t in state.values())


@register("projector")
class ProjectorPretrain(Recipe):
    checkpoint_kind = checkpoint_kinds.PROJECTOR

    @staticmethod
    def selected_by(model_args, training_args) -> bool:
        return model_args.tune_mm_mlp_adapter

    def tuning(self) -> dict[str, str]:
        return {"language_model": FROZEN, "vision_tower": FROZEN, "projector": FULL}


@register("full")
class FullFinetune(Recipe):
    checkpoint_kind = checkpoint_kinds.FULL

    @staticmethod
    def selected_by(model_args, training_args) -> bool:
        return not model_args.tune_mm_mlp_adapter and not training_args.lora_enable


@register("lora")
class LoraFinetune(Recipe):
    checkpoint_kind = checkpoint_kinds.LORA

    @staticmethod
    def selected_by(model_args, training_args) -> bool:
        return not model_args.tune_mm_mlp_adapter and training_args.lora_enable

    def tuning(self) -> dict[str, str]:
        return {**super().tuning(), "language_model": LORA}


@register("qlora")
class QLoraFinetune(LoraFinetune):
    @staticmethod
    def selected_by(model_args, training_args) -> bool:
        return LoraFinetune.selected_by(model_args, training_args) and training_args.bits in (4, 8)

    def quantization_config(self, dtype: torch.dtype):
        from transformers import BitsAndBytesConfig

        args = self.training_args
        # Full prefixes: a bare "vision_tower" would quantize the tower and projector of a LLaVA start too.
        return BitsAndBytesConfig(load_in_4bit=args.bits == 4, load_in_8bit=args.bits == 8,
                                  bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=args.double_quant,
                                  bnb_4bit_quant_type=args.quant_type,
                                  llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])

    def _add_adapters(self, model):
        from peft import prepare_model_for_kbit_training

        args = self.training_args
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        for name, param in model.named_parameters():  # peft's preparation freezes everything: keep our choice
            param.requires_grad_(name in trainable)
        return super()._add_adapters(model)
