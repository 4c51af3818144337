"""`LlavaTrainer`: the HF Trainer for one recipe (its parameter groups and checkpoint kind), with
modality-grouped batches, token-weighted losses, one evaluation loop, the NaN guard and checkpoints
that appear only when complete (it asks the run folder's owner, `run_dir.RunFolder`)."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from transformers import Trainer

from .callbacks import IgnorePreemptionInWorkers, NonFiniteLossGuard
from .dataset import CollatorWithMetadata
from .fast_path import chunked_causal_lm_loss
from .recipes import Recipe
from .run_dir import RunFolder

logger = logging.getLogger(__name__)


def modality_grouped_indices(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """A shuffled order whose consecutive `batch_size` chunks hold one modality of similar lengths.

    `lengths` are positive for image samples and negative for text-only ones (LLaVA's convention).
    Each modality is shuffled, cut into mega-batches sorted by length, then batches of both
    modalities are shuffled together; the last, incomplete batches are kept at the end.
    """
    groups = [[i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n <= 0]]
    batches, leftovers = [], []
    for group in groups:
        if not group:
            continue
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        mega = batch_size * 50
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -abs(lengths[i]))
            for b in range(0, len(chunk), batch_size):
                (batches if len(chunk[b:b + batch_size]) == batch_size else leftovers).append(chunk[b:b + batch_size])
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled + leftovers for i in batch]


class ModalityLengthGroupedSampler(Sampler):
    """Deterministic per (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.batch_size, generator))


class LlavaTrainer(Trainer):
    """The HF Trainer for one `Recipe`. Private Trainer methods are overridden only where it offers no
    public hook; each says why and the transformers version it was checked against (tests/test_trainer_hooks.py
    fails when one's signature changes)."""

    def __init__(self, *args, recipe: Recipe, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.run_folder = RunFolder(self.args.output_dir)
        self._checkpoint_parent: str | None = None  # while a checkpoint is written: its staging folder
        self.last_sample_ids: list[str] = []
        if self.data_collator is not None:  # samples skipped mid-run travel in the batch to this process
            self.data_collator = CollatorWithMetadata(self.data_collator)
        self.nan_guard = NonFiniteLossGuard(getattr(self.args, "skip_nan_steps", False), self.args.output_dir,
                                            self.run_folder.newest_checkpoint,
                                            write_report=self.args.should_save)
        self.add_callback(self.nan_guard)

    # --- batches -------------------------------------------------------------------------
    def get_train_dataloader(self):
        return _workers_ignore_preemption(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return _workers_ignore_preemption(super().get_eval_dataloader(eval_dataset))

    # Private (checked against transformers 5.25.0): no public hook chooses the sampler.
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Also for --train_sampling_strategy group_by_length: the stock sampler would load every sample
        # (decoding its image) just to measure its length.
        if self.args.group_by_modality_length or self.args.train_sampling_strategy == "group_by_length":
            batch = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            return ModalityLengthGroupedSampler(dataset.modality_lengths, batch, self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # --- optimizer: the recipe's parameter groups (projector and tower learning rates) -----
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            groups = self.recipe.parameter_groups(model, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # --- batches reach the model without their metadata (dataset.CollatorWithMetadata) ------
    def model_inputs(self, batch: dict, training: bool) -> dict:
        """The batch without its metadata. A training batch's sample ids are kept for the NaN guard and its
        skipped samples recorded; an eval batch's skipped samples were logged by its dataset."""
        inputs, metadata = CollatorWithMetadata.split(batch)
        if training:
            self.last_sample_ids = metadata.sample_ids
            if metadata.skipped and hasattr(self.train_dataset, "record_skipped"):
                self.train_dataset.record_skipped(metadata.skipped, self.args.process_index)
        return inputs

    def prepared_batches(self, dataloader):
        """The batches of an eval-style pass (no training), as model inputs on this process's device."""
        for batch in dataloader:
            yield self._prepare_inputs(self.model_inputs(batch, training=False))

    # --- loss ----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.model_inputs(inputs, training=model.training)
        return self._checked_loss(model, self.objective_loss(model, inputs, return_outputs, num_items_in_batch))

    def objective_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The loss of a batch without metadata (what `compute_loss` returns; `DPOTrainer` has its own)."""
        if self.args.chunked_ce and not return_outputs:
            loss = chunked_causal_lm_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As Trainer.compute_loss: the token count is global and DDP/DeepSpeed average over ranks.
                loss = loss * self.accelerator.num_processes
            return loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _checked_loss(self, model, result):
        """A NaN/inf training loss is caught here, before backward (see callbacks.NonFiniteLossGuard)."""
        if model.training:
            loss = result[0] if isinstance(result, tuple) else result
            self.nan_guard.check(loss, self.state.global_step + 1, self.last_sample_ids)
        return result

    # --- evaluation: one loop; each objective adds up its own sums ------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Every batch's sums (`eval_sums`) added up over the eval set become the logged metrics (`eval_metrics`)."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self._wrap_model(self.model, training=False, dataloader=dataloader)
        was_training = model.training
        model.eval()
        total = None
        with torch.no_grad():
            for inputs in self.prepared_batches(dataloader):
                sums = self.eval_sums(model, inputs)
                total = sums if total is None else total + sums
        model.train(was_training)
        metrics = self.eval_metrics(total, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def eval_sums(self, model, inputs: dict) -> torch.Tensor:
        """(loss x supervised tokens, supervised tokens) of one batch on this process."""
        tokens = (inputs["labels"][:, 1:] != -100).sum()
        loss = model(**inputs).loss
        return torch.stack([loss.double() * tokens, tokens.double()])

    def eval_metrics(self, total: torch.Tensor | None, metric_key_prefix: str) -> dict:
        """Eval loss = mean over all supervised tokens of the eval set (the training loss's definition),
        not a mean of per-batch means."""
        if total is None:
            total = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        return {f"{metric_key_prefix}_loss": (total[0] / total[1].clamp(min=1)).item(),
                f"{metric_key_prefix}_tokens": int(total[1].item())}

    # --- checkpoints: written by the recipe, published only when complete ----------------
    # Private (checked against transformers 5.25.0): no public hook writes a checkpoint elsewhere and publishes it.
    def _save_checkpoint(self, model, trial):
        """checkpoint-N appears complete or not at all: the Trainer writes it into the run folder's staging
        folder (`_get_output_dir`), published as checkpoint-N once weights, optimizer and trainer_state.json
        are on disk on every process (`RunFolder.publish`, which also rotates old ones away)."""
        step = self.state.global_step
        # A process that fails here (a full disk) raises at once: the others, left waiting for it, are ended by
        # distributed.PeerWatchdog naming it, and nothing unfinished is published.
        with self.run_folder.writing_checkpoint(step, self.checkpoint_bytes_needed, self.args.should_save) as staging:
            self._checkpoint_parent = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._checkpoint_parent = None
            if self.args.should_save:
                self.run_folder.record_run_shape(step, self.args)
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            self.run_folder.publish(step, self.state, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    # Private (checked against transformers 5.25.0): where the Trainer's _save_checkpoint puts checkpoint-N; the
    # staging folder while `_save_checkpoint` writes (TrainingArguments.output_dir is never changed).
    def _get_output_dir(self, trial):
        return self._checkpoint_parent or super()._get_output_dir(trial)

    def checkpoint_bytes_needed(self, include_optimizer: bool = True) -> int:
        """About what a save writes (weights, and the optimizer state for a resumable checkpoint)."""
        resumable = include_optimizer and not self.args.save_only_model
        return self.recipe.bytes_needed(self.accelerator.unwrap_model(self.model),
                                        self.optimizer if resumable else None)

    # Private (checked against transformers 5.25.0): where save_model hands over the ZeRO-3-gathered weights.
    def _save(self, output_dir=None, state_dict=None):
        if self.args.should_save:
            self.recipe.save(self.accelerator.unwrap_model(self.model), self.processing_class,
                             output_dir or self.args.output_dir, state_dict=state_dict)

    # Private (checked against transformers 5.25.0): the Trainer reads only its own checkpoint formats.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled:  # the engine checkpoint (global_step*/) restores everything
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.recipe.load(model if model is not None else self.model, resume_from_checkpoint)

    # Private (checked against transformers 5.25.0): as _load_from_checkpoint.
    def _load_best_model(self):
        self.recipe.load(self.model, self.state.best_model_checkpoint)


def _workers_ignore_preemption(dataloader):
    """A preemption signal must not kill the dataloader workers (callbacks.IgnorePreemptionInWorkers)."""
    if dataloader.num_workers:
        torch_loader = getattr(dataloader, "base_dataloader", dataloader)  # accelerate wraps the DataLoader
        torch_loader.worker_init_fn = IgnorePreemptionInWorkers(torch_loader.worker_init_fn)
    return dataloader
