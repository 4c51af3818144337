"""Preference pairs -> DPO training examples (lazy), and the collator that batches them.

Everything a supervised dataset does holds here (checks before training, `--skip_bad_samples`,
images decoded per item, failures named by sample): `PreferenceDataset` is a `LazySupervisedDataset`
whose items are pairs (`llava_tiny.preference.tokenize_preference`).
"""
from __future__ import annotations

import torch

from ..data import is_preference_record, preference_parts, sample_id, sample_images
from ..preference import tokenize_preference
from .dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset

NOT_A_PAIR = ("not a preference record: expected 'prompt' (or 'messages'), 'chosen' and 'rejected' "
              "(an SFT conversation belongs in train.py's data)")


class PreferenceDataset(LazySupervisedDataset):
    """Preference records (`llava_tiny.data`: LLaVA-NeXT or `messages` form), checked before training;
    each item holds the chosen and the rejected sequence of one pair, and the pair's images once."""

    def _unfit_samples(self, samples, known) -> dict[str, str]:
        not_pairs = {}
        for i, sample in enumerate(samples):
            if sample_id(sample, i) not in known and not is_preference_record(sample):
                not_pairs[sample_id(sample, i)] = NOT_A_PAIR
        return {**not_pairs, **super()._unfit_samples(samples, {**known, **not_pairs})}

    def _modality_length(self, sample: dict) -> int:
        """Words of the earlier turns, the prompt and the longer answer (+ image tokens); negative when text-only."""
        parts = preference_parts(sample)
        words = sum(len(str(text).split()) for text in [*(t["value"] for t in parts.history), parts.prompt,
                                                         max(parts.chosen, parts.rejected, key=len)])
        n_images = len(sample_images(sample))
        return words + n_images * self.num_image_tokens if n_images else -words

    def _load_item(self, index: int) -> dict:
        sample, sid = self.samples[index], self.ids[index]
        pair = tokenize_preference(sample, self.tokenizer, self.template, self.num_image_tokens,
                                   model_max_length=self.model_max_length, sample_id=sid)
        item = {"chosen_input_ids": torch.tensor(pair.chosen.input_ids), "chosen_labels": torch.tensor(pair.chosen.labels),
                "rejected_input_ids": torch.tensor(pair.rejected.input_ids),
                "rejected_labels": torch.tensor(pair.rejected.labels), "sample_id": sid, "pair_index": index}
        paths = sample_images(sample)
        if paths:
            item["pixel_values"] = self._load_images(paths, sid)
        return item


class PreferenceCollator:
    """Right-padded rows: every pair's chosen sequence, then every pair's rejected one (same order), with
    the images stacked in row order (each pair's images twice); `pair_index` names each pair's dataset
    position (for precomputed reference log-probs)."""

    def __init__(self, pad_token_id: int):
        self.rows = DataCollatorForSupervisedDataset(pad_token_id)

    def __call__(self, items: list[dict]) -> dict:
        rows = [{"input_ids": item[f"{side}_input_ids"], "labels": item[f"{side}_labels"], "sample_id": item["sample_id"],
                 **({"pixel_values": item["pixel_values"]} if "pixel_values" in item else {})}
                for side in ("chosen", "rejected") for item in items]
        batch = self.rows(rows)
        batch["sample_ids"] = batch["sample_ids"][:len(items)]
        batch["pair_index"] = torch.tensor([item["pair_index"] for item in items])
        return batch
