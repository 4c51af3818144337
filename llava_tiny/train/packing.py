"""Padding-free batches: a batch's samples packed into one row, attention kept inside each sample.

The packed row concatenates the samples and numbers each one's `position_ids` from 0, with no
`attention_mask`; `packed_segments` lists where each sample starts and ends. The language model
then attends within each sample only:

- flash-attention-2/3: transformers reads the position restarts and runs the varlen kernel;
- SDPA: `packed_sdpa_attention` (installed by `use_packed_attention`) runs transformers' own SDPA
  attention on each sample's slice, causal, with no mask. transformers could also keep SDPA and
  turn the position restarts into a block-diagonal mask (`masking_utils.find_packed_sequence_indices`),
  but SDPA then computes every masked block of the row: attention cost grows with the square of
  the whole row instead of each sample, which on small models costs more than the padding saved.

Two details keep a packed batch equal to its samples run one by one:
- the first label of every sample is -100, so a sample's last token is never trained to predict
  the next sample's first token (alone, that position has no target either);
- `use_cache=False` goes into the batch: with a KV cache transformers skips packed-sequence
  detection, and flash-attention would attend across samples.

Images are stacked in sample order, the order in which LLaVA fills the image placeholders.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..conversation import IGNORE_INDEX
from ..model.modeling import language_model as language_of
from .dataset import DataCollatorForSupervisedDataset

PACKED_SDPA = "sdpa_packed"


def packed_sdpa_attention(module, query, key, value, attention_mask, packed_segments=None, **kwargs):
    """transformers' SDPA attention, run on each packed sample alone.

    `query`/`key`/`value` are (rows, heads, positions, head_dim); `packed_segments[row]` holds the
    (start, end) of each sample of that row, in order from position 0. Each sample's slice gets
    causal SDPA with no mask (the kernels' fast path, no masked block computed); positions after the
    last sample get zeros. Without `packed_segments` (an unpacked batch) this is plain SDPA.
    """
    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for row, segments in enumerate(packed_segments):
        # split (not one slice per sample): backward then concatenates the slices' gradients once
        # instead of adding each into a zero tensor of the full row.
        sizes = [end - start for start, end in segments]
        tail = query.shape[2] - segments[-1][1]
        q, k, v = (t[row:row + 1].split(sizes + [tail], dim=2) for t in (query, key, value))
        pieces = [sdpa_attention_forward(module, q[i], k[i], v[i], None, **kwargs)[0] for i in range(len(sizes))]
        if tail:
            pieces.append(query.new_zeros(1, tail, query.shape[1], value.shape[-1]))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows), None


def packed_attention_problem(model) -> str | None:
    """Why `--packing` cannot run on `model`'s attention implementation, or None: flash-attention (its varlen
    kernel follows `position_ids`) and SDPA (run per sample) keep samples apart; any other implementation
    would attend over the whole packed row."""
    implementation = language_of(model).config._attn_implementation
    if implementation in (PACKED_SDPA, "sdpa", "flash_attention_2", "flash_attention_3"):
        return None
    return (f"--packing needs attn_implementation 'sdpa' or 'flash_attention_2'; the language model "
            f"uses {implementation!r}")


def use_packed_attention(model) -> None:
    """Make the language model of `model` attend within each packed sample: SDPA is switched to
    `packed_sdpa_attention`, flash-attention needs nothing, others are refused (`packed_attention_problem`,
    which the flag check runs first). The switch is not saved in checkpoints.
    """
    problem = packed_attention_problem(model)
    if problem:
        raise ValueError(problem)
    language_model = language_of(model)
    if language_model.config._attn_implementation == "sdpa":
        AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
        language_model.config._attn_implementation = PACKED_SDPA


class PackingCollator:
    """Packs a batch of tokenized samples into one row.

    Gives `input_ids`, `labels`, `position_ids` (restarting at 0 for each sample), `packed_segments`
    ((start, end) per sample, per row, tiling the row), `use_cache=False`, `logits_to_keep` (the
    positions whose next token is supervised) with their `shift_labels`, `sample_ids` and
    `pixel_values` (sample order); no `attention_mask` and no padding.
    """

    def __call__(self, items: list[dict]) -> dict:
        lengths = [len(item["input_ids"]) for item in items]
        input_ids = torch.cat([item["input_ids"] for item in items])[None]
        labels = torch.cat([item["labels"] for item in items])[None]
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        segments, start = [], 0
        for n in lengths:
            labels[0, start] = IGNORE_INDEX
            segments.append((start, start + n))
            start += n
        # Logits only where the next token is supervised: lm_head and the loss skip image, prompt
        # and system positions. `shift_labels` are those next tokens, in the same order.
        targets = labels[0, 1:]
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 "packed_segments": [segments], "use_cache": False,
                 "logits_to_keep": keep[None], "shift_labels": targets[keep][None],
                 "sample_ids": [item["sample_id"] for item in items]}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


def make_data_collator(pad_token_id: int, packing: bool):
    """The collator for these flags: one packed row with `--packing`, right-padded rows otherwise."""
    return PackingCollator() if packing else DataCollatorForSupervisedDataset(pad_token_id)
