"""Preference tuning (DPO) of a LLaVA: `train.py`'s run (flags, recipes, checkpoints, resume, preemption,
NaN guard, DeepSpeed) with preference pairs and the DPO loss; train.py's `--packing` and `--chunked_ce` are
not DPO flags.

    deepspeed llava_tiny/train/train_dpo.py --deepspeed zero_configs/zero3.json \\
        --model_name_or_path runs/sft --lora_enable True --freeze_mm_mlp_adapter True \\
        --data_path pairs.json --image_folder data/images --output_dir runs/dpo --dpo_beta 0.1
    python llava_tiny/train/train_dpo.py ... (one process, no DeepSpeed)

The starting point is what `train.py` starts from (a fine-tuned folder of this project, or an LLM +
--vision_tower [+ --pretrain_mm_mlp_adapter]), prepared by the same recipe, and the checkpoint is
the recipe's (LoRA with --lora_enable, full otherwise). See `dpo_trainer.py` for the reference model.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar

if __package__ in (None, ""):  # `deepspeed llava_tiny/train/train_dpo.py`: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from llava_tiny.train.arguments import CommonTrainingArguments, RunArguments  # noqa: E402
from llava_tiny.train.dpo import LOSS_TYPES  # noqa: E402
from llava_tiny.train.dpo_trainer import DPOTrainer  # noqa: E402
from llava_tiny.train.preference_dataset import PreferenceCollator, PreferenceDataset  # noqa: E402
from llava_tiny.train.starting_point import is_text_only  # noqa: E402
from llava_tiny.train.train import load_model_for_training, make_datasets, train  # noqa: E402


@dataclass
class DPOTrainingArguments(CommonTrainingArguments):
    """The flags every run shares plus DPO's. train.py's batching and loss flags (--packing, --chunked_ce) are not
    here, so passing them is an unknown flag: DPO needs each answer's log-probability per row."""

    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta: how far the policy may move from the reference."})
    dpo_loss: str = field(default="sigmoid", metadata={"help": f"DPO loss: {', '.join(LOSS_TYPES)}."})
    dpo_sft_weight: float = field(default=0.0, metadata={"help": "Weight of an SFT term on the chosen answers (RPO, MPO)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute the reference log-probs once, "
                                                                            "before the first step (no reference model in memory)."})

    used_by: ClassVar[str] = "DPO"

    def check(self, run: RunArguments) -> list[str]:
        problems = super().check(run)
        if self.dpo_loss not in LOSS_TYPES:
            problems.append(f"--dpo_loss {self.dpo_loss!r}: expected one of {', '.join(LOSS_TYPES)}")
        if not self.dpo_beta > 0:
            problems.append(f"--dpo_beta {self.dpo_beta}: expected a positive number (0.1 is usual)")
        if self.dpo_sft_weight < 0:
            problems.append(f"--dpo_sft_weight {self.dpo_sft_weight}: expected 0 (off) or a positive weight")
        if self.lora_enable and not self.precompute_ref_log_probs and not is_text_only(run.model, self) and \
                (not self.freeze_mm_mlp_adapter or run.model.unfreeze_mm_vision_tower):  # text-only: adapters alone
            problems.append("--lora_enable: the reference model is this model with its adapters disabled, so nothing "
                            "but the adapters may train: add --freeze_mm_mlp_adapter True (and drop "
                            "--unfreeze_mm_vision_tower), or pass --precompute_ref_log_probs True")
        return problems


def build_dpo_trainer(args: RunArguments, attn_implementation: str | None = None) -> DPOTrainer:
    """The model (with the recipe applied), the preference datasets and the DPO trainer for parsed `args`."""
    loaded, model, recipe = load_model_for_training(args, attn_implementation)
    train_dataset, eval_dataset = make_datasets(loaded, args, PreferenceDataset)
    return DPOTrainer(model=model, args=args.training, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=PreferenceCollator(loaded.tokenizer.pad_token_id),
                      processing_class=loaded.processor, recipe=recipe,
                      make_reference=lambda: load_model_for_training(args, attn_implementation)[1])


def train_dpo(attn_implementation: str | None = "flash_attention_2", argv: list[str] | None = None) -> None:
    """Run one DPO job from command-line flags (flash attention when usable, as train_mem.py)."""
    train(attn_implementation, argv, training_class=DPOTrainingArguments, build=build_dpo_trainer)


if __name__ == "__main__":
    train_dpo()
