"""What a training checkpoint holds for each recipe, written so `load_pretrained_model` reads it.

    projector  mm_projector.safetensors + config.json + processor
    lora       adapter (peft) + non_lora_trainables.safetensors + config.json + processor
    full       model.safetensors + config.json + processor (stock-loadable for mlp2x_gelu)

Under ZeRO-3 the Trainer hands us a gathered state dict; an empty tensor here means a partitioned
parameter slipped through, and saving it would write a checkpoint that cannot be loaded.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..model.builder import NON_LORA_FILE, PROJECTOR_FILE, load_projector_weights

_PEFT_PREFIX = "base_model.model."


def _plain_name(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")


def _check_not_empty(state_dict: dict[str, torch.Tensor], where: str) -> None:
    empty = [k for k, v in state_dict.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save {where}: {len(empty)} empty tensors (ZeRO-3 partitions not gathered), "
                           f"e.g. {empty[:3]}; set stage3_gather_16bit_weights_on_model_save in the ZeRO config")


def save_trained(model, recipe: str, processor, output_dir: str, state_dict: dict | None = None) -> None:
    """Write the checkpoint of `recipe` from `model` (unwrapped; a PeftModel for LoRA)."""
    os.makedirs(output_dir, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    base = model.get_base_model() if recipe == "lora" else model
    if recipe == "projector":
        projector = {k: v for k, v in ((_plain_name(k), v) for k, v in state_dict.items())
                     if k.startswith("model.multi_modal_projector.")}
        _check_not_empty(projector, output_dir)
        save_file(projector, os.path.join(output_dir, PROJECTOR_FILE), metadata={"format": "pt"})
    elif recipe == "lora":
        trainable = {_plain_name(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        non_lora = {k: v for k, v in ((_plain_name(k), v) for k, v in state_dict.items() if "lora_" not in k)
                    if k in trainable}
        _check_not_empty(non_lora, output_dir)
        _check_not_empty({k: v for k, v in state_dict.items() if "lora_" in k}, output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        save_file(non_lora, os.path.join(output_dir, NON_LORA_FILE), metadata={"format": "pt"})
    elif recipe == "full":
        _check_not_empty(state_dict, output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    else:
        raise ValueError(f"unknown recipe {recipe!r}")
    base.config.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def load_trained(model, recipe: str, checkpoint_dir: str) -> None:
    """Load a checkpoint written by `save_trained` into the live training model (resume without DeepSpeed)."""
    if recipe == "projector":
        load_projector_weights(model, checkpoint_dir)
        return
    if recipe == "lora":
        from peft import set_peft_model_state_dict

        adapter = load_file(os.path.join(checkpoint_dir, "adapter_model.safetensors"))
        set_peft_model_state_dict(model, adapter)
        state = load_file(os.path.join(checkpoint_dir, NON_LORA_FILE))
        model.get_base_model().load_state_dict(state, strict=False)
        return
    state = load_file(os.path.join(checkpoint_dir, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{checkpoint_dir}: weights the model does not have: {unexpected[:5]}")


# In a checkpoint only to resume from it (optimizer, scheduler, RNG, DeepSpeed engine); not in a final model.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "latest", "zero_to_fp32.py", "trainer_state.json")


def saved_at_last_step(checkpoint_dir: str) -> bool:
    """Whether the checkpoint is the run's last step (HF saves one there with --save_strategy steps)."""
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        state = json.load(f)
    return 0 < state.get("max_steps", 0) <= state["global_step"]


def finish_from_last_step(checkpoint_dir: str, output_dir: str, load_best_model_at_end: bool = False) -> None:
    """Write the final model folder from a last-step checkpoint: what the final save writes, with
    trainer_state.json last. (Resumed there, the HF Trainer would train one step past max_steps.)"""
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        best = json.load(f).get("best_model_checkpoint")
    source = best if load_best_model_at_end and best and os.path.isdir(best) else checkpoint_dir
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name not in _RESUME_ONLY and not name.startswith("rng_state"):
            shutil.copy2(path, os.path.join(output_dir, name))
    shutil.copy2(os.path.join(checkpoint_dir, "trainer_state.json"), os.path.join(output_dir, "trainer_state.json"))
