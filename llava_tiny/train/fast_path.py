"""The training fast path beyond batching (batching is `packing.py`):

- a frozen vision tower runs under `torch.no_grad()`, so no autograd graph is kept for it;
- `--chunked_ce`: the loss is computed from the final hidden states in chunks, so full-vocabulary
  logits never exist for every position at once.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..conversation import IGNORE_INDEX
from ..model.modeling import unwrap_model

# Logits per cross-entropy chunk: 2^25 values, 128 MB in float32 (1024 positions of a 32k vocabulary).
CE_CHUNK_LOGITS = 1 << 25


def _forward_without_grad_when_frozen(self, *args, **kwargs):
    if torch.is_grad_enabled() and not any(p.requires_grad for p in self.parameters()):
        with torch.no_grad():
            return type(self).forward(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def run_frozen_tower_without_grad(model) -> None:
    """Make the vision tower of `model` run under `torch.no_grad()` whenever none of its parameters trains.

    A frozen tower needs no graph, yet transformers 5's `enable_input_require_grads` (called by peft
    for LoRA with gradient checkpointing, and by QLoRA's preparation) hooks the input embeddings of
    every sub-model, the tower's patch embedding included: the stock forward then records the whole
    tower, keeps its activations and backpropagates through it into nothing. The check is made per
    call, so a tower unfrozen later trains normally. Results are unchanged (no tower gradient exists).
    """
    tower = getattr(getattr(unwrap_model(model), "model", None), "vision_tower", None)
    if tower is None:  # a text-only model
        return
    # A method bound to the tower (not a closure), so a deepcopy of the model rebinds it to the copy.
    tower.forward = types.MethodType(_forward_without_grad_when_frozen, tower)


def _chunk_loss_sum(lm_head, hidden, targets):
    logits = lm_head(hidden).float()  # the float32 upcast of transformers' ForCausalLMLoss
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(model, inputs: dict, num_items_in_batch=None, chunk_logits: int = CE_CHUNK_LOGITS):
    """The causal-LM loss of `model(**inputs)` (inputs hold `labels`, or `logits_to_keep` positions
    with their `shift_labels` as `PackingCollator` gives them), without full-vocabulary logits.

    The model is asked for no logits (`logits_to_keep` selects no position) and for its hidden
    states; positions then go through `lm_head` and cross-entropy a chunk at a time under activation
    checkpointing, so backward recomputes each chunk's logits instead of keeping them: at most one
    chunk of logits exists at once, for one extra `lm_head` forward. Equal to the standard loss and
    its gradients: the sum over supervised tokens divided by `num_items_in_batch` (the mean if None).
    """
    labels = inputs["labels"]
    positions = inputs.get("logits_to_keep")  # PackingCollator's: positions with a supervised next token
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "logits_to_keep")}
    no_position = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    outputs = model(**model_inputs, logits_to_keep=no_position, output_hidden_states=True)
    hidden = outputs.hidden_states[-1]  # after the final norm: what lm_head reads
    lm_head = unwrap_model(model).get_output_embeddings()
    if positions is not None:
        hidden = hidden.take_along_dim(positions[..., None], dim=1)
        targets = inputs["shift_labels"]
    else:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    step = max(1, chunk_logits // lm_head.out_features)  # positions per chunk
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], step):
        total = total + checkpoint(_chunk_loss_sum, lm_head, hidden[start:start + step], targets[start:start + step],
                                   use_reentrant=False)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
