"""`DPOTrainer`: the `LlavaTrainer` of a run (recipe, checkpoints, resume, preemption, NaN guard) with
the DPO loss, its figures logged under TRL's names, and a reference model:

    LoRA / QLoRA                   the same model with its adapters disabled (no second copy)
    full (or projector) recipes    a frozen copy of the starting point; under ZeRO-3 partitioned like
                                   the policy (its own DeepSpeed engine, no optimizer)
    --precompute_ref_log_probs     every pair's reference log-probs computed once, by the model as it
                                   starts, before the first step; kept in OUTPUT_DIR/ref_log_probs.json,
                                   which a resumed run reads back
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from .dpo import dpo_loss, figure_means, model_answer_log_probs, pair_figures
from .trainer import LlavaTrainer

logger = logging.getLogger(__name__)

REF_LOG_PROBS_FILE = "ref_log_probs.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DPOTrainer(LlavaTrainer):
    """`LlavaTrainer` with the DPO objective. `make_reference` builds the starting point again (the frozen
    reference of recipes without adapters); it is not called for LoRA or --precompute_ref_log_probs."""

    def __init__(self, *args, make_reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        # The DPO loss is a mean over pairs, not a token sum: the Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.reference_model = None
        self.reference_table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (chosen, rejected)
        self._train_sums = None
        if self.args.precompute_ref_log_probs:
            self.add_callback(_PrecomputeReference(self))
        elif not hasattr(self.model, "disable_adapter"):
            self.reference_model = self._prepare_reference(make_reference())

    # --- the reference -------------------------------------------------------------------------
    def _prepare_reference(self, model):
        model.requires_grad_(False)
        model.eval()
        if not (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
            return model.to(self.args.device)  # ZeRO-2 and plain runs: parameters are not partitioned
        import deepspeed

        # As TRL's prepare_deepspeed: the policy's ZeRO-3 config without optimizer and scheduler; the sizes
        # the Trainer fills from the model at train time ("auto") are filled here.
        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        hidden = model.config.text_config.hidden_size
        zero = config["zero_optimization"]
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_param_persistence_threshold", 10 * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        zero.pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine

    def reference_log_probs(self, inputs: dict, pair_index: torch.Tensor, split: str = "train"):
        """(chosen, rejected) answer log-probs of the batch under the reference model."""
        if self.reference_table:
            chosen, rejected = self.reference_table[split]
            index = pair_index.cpu()
            return chosen[index].to(self.args.device), rejected[index].to(self.args.device)
        with torch.no_grad():
            if self.reference_model is not None:
                reference = model_answer_log_probs(self.reference_model, inputs)
            else:
                with self.model.disable_adapter():  # the PeftModel: LoRA off is the starting point
                    reference = model_answer_log_probs(self.model, inputs)
        return reference.split()

    def load_or_compute_reference(self, global_step: int) -> None:
        """--precompute_ref_log_probs: read OUTPUT_DIR/ref_log_probs.json, or compute it with the model as
        it starts (step 0) and write it. A resumed run without the file cannot recover the starting model."""
        path = os.path.join(self.args.output_dir, REF_LOG_PROBS_FILE)
        splits = {"train": self.train_dataset, **({"eval": self.eval_dataset} if self.eval_dataset is not None else {})}
        if os.path.isfile(path):
            with open(path) as f:
                table = json.load(f)
            logger.info("reference log-probs read from %s", path)
        elif global_step > 0:
            raise FileNotFoundError(f"{path} is missing: this run resumes at step {global_step} with "
                                    "--precompute_ref_log_probs, and the reference log-probs are computed by the model "
                                    "as it was at step 0. Start over (--overwrite_output_dir)")
        else:
            table = {split: self._compute_reference(dataset) for split, dataset in splits.items()}
            if self.args.should_save:
                os.makedirs(self.args.output_dir, exist_ok=True)
                with open(path, "w") as f:
                    json.dump(table, f)
            logger.info("reference log-probs of %s computed before the first step, kept in %s",
                        " and ".join(f"{len(t['ids'])} {s} pairs" for s, t in table.items()), path)
        for split, dataset in splits.items():
            if table.get(split, {}).get("ids") != list(dataset.ids):
                raise ValueError(f"{path} holds reference log-probs of other {split} pairs than this run's data; "
                                 "start over (--overwrite_output_dir)")
            self.reference_table[split] = (torch.tensor(table[split]["chosen"]), torch.tensor(table[split]["rejected"]))

    def _compute_reference(self, dataset) -> dict:
        """Every pair's log-probs under the current model. Each process takes an equal share (padded with the
        last pair, so every process runs the same number of forwards: ZeRO-3 gathers in lockstep)."""
        rank, world, n = self.args.process_index, self.args.world_size, len(dataset)
        share = math.ceil(n / world)
        mine = [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]
        loader = DataLoader(Subset(dataset, mine), batch_size=self.args.per_device_eval_batch_size,
                            collate_fn=self.data_collator)
        was_training = self.model.training
        self.model.eval()
        found = []
        with torch.no_grad():
            for batch in self.prepared_batches(loader):
                chosen, rejected = model_answer_log_probs(self.model, batch).split()
                found += zip(batch["pair_index"].tolist(), chosen.tolist(), rejected.tolist())
        self.model.train(was_training)
        if _distributed():
            everyone = [None] * world
            dist.all_gather_object(everyone, found)
            found = [entry for part in everyone for entry in part]
        chosen, rejected = [math.nan] * n, [math.nan] * n
        for index, c, r in found:
            chosen[index], rejected[index] = c, r
        return {"ids": list(dataset.ids), "chosen": chosen, "rejected": rejected}

    # --- the loss and its figures --------------------------------------------------------------
    def _dpo(self, model, inputs: dict, split: str):
        pair_index = inputs.pop("pair_index")
        policy = model_answer_log_probs(model, inputs)
        ref_chosen, ref_rejected = self.reference_log_probs(inputs, pair_index, split)
        args = self.args
        return dpo_loss(policy, ref_chosen, ref_rejected, args.dpo_beta, args.dpo_loss, args.dpo_sft_weight)

    def objective_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        result = self._dpo(model, inputs, "train" if model.training else "eval")
        if model.training:  # figure sums and the pair count, logged (then reset) by `log`
            rows = pair_figures(result)
            sums = torch.cat([rows.sum(0), rows.new_tensor([len(rows)])])
            self._train_sums = sums if self._train_sums is None else self._train_sums + sums
        return (result.loss, None) if return_outputs else result.loss

    def log(self, logs: dict, start_time=None) -> None:
        """Training logs get the figures of the pairs since the last log (every process calls this together)."""
        if "loss" in logs and self._train_sums is not None:
            sums = self._train_sums
            if _distributed():
                dist.all_reduce(sums)
            logs.update(figure_means(sums[:-1], sums[-1].item()))
            self._train_sums = None
        super().log(logs, start_time)

    def eval_sums(self, model, inputs: dict) -> torch.Tensor:
        """Summed over every process's pairs (without the padding): DPO loss, chosen NLL, chosen tokens, the
        figures; the pair count last."""
        result = self._dpo(model, inputs, "eval")
        rows = torch.cat([torch.stack([result.losses, -result.chosen_logps, result.chosen_tokens], 1).double(),
                          pair_figures(result)], dim=1)
        rows = self.accelerator.gather_for_metrics(rows)
        return torch.cat([rows.sum(0), rows.new_tensor([len(rows)])])

    def eval_metrics(self, total: torch.Tensor, metric_key_prefix: str) -> dict:
        """The DPO loss and figures as means over every pair of the eval set (`eval_loss`, `eval_rewards/...`)."""
        pairs = int(total[-1].item())
        # The SFT term as in training: the chosen answers' negative log-likelihood per token.
        sft = self.args.dpo_sft_weight * total[1] / max(total[2].item(), 1) if self.args.dpo_sft_weight else 0
        return {f"{metric_key_prefix}_loss": float(total[0] / max(pairs, 1) + sft),
                **figure_means(total[3:-1], pairs, metric_key_prefix + "_"), f"{metric_key_prefix}_pairs": pairs}


class _PrecomputeReference(TrainerCallback):
    """Computes (or reads back) the reference log-probs once the model is ready, before the first step."""

    def __init__(self, trainer: DPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.load_or_compute_reference(state.global_step)
