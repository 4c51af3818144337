"""The DPO objective: answer log-probabilities, the loss (`sigmoid`, `ipo`, `hinge`) and its figures.

The math is TRL's (`DPOTrainer._compute_loss`, trl 1.16), written here because TRL's trainer
cannot keep this project's labels, templates, recipes and checkpoints (see docs/dpo.md, "Why not
TRL's `DPOTrainer`"); `tests/test_dpo_loss.py` checks loss and figures against TRL itself on the same batch.

A batch holds the chosen rows first, then the rejected rows in the same pair order
(`PreferenceCollator`); a row's log-probability is the sum over its supervised tokens (the final
answer and its end-of-turn token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..conversation import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# The figures logged each step and on the eval set, with TRL's names.
FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass
class AnswerLogProbs:
    """Per row of a preference batch: the summed log-probability of its supervised tokens, and their count."""

    logps: torch.Tensor  # (rows,)
    tokens: torch.Tensor  # (rows,)

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) halves."""
        return self.logps.chunk(2)


def answer_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> AnswerLogProbs:
    """Sum of log p(label) over each row's supervised positions (labels shifted as in causal-LM loss).

    Computed in float32 as logit - logsumexp, so no full log-softmax tensor is kept besides the logits.
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return AnswerLogProbs((picked * mask).sum(-1), mask.sum(-1))


def model_answer_log_probs(model, batch: dict) -> AnswerLogProbs:
    """Run `model` on a preference batch (no labels given to it: no causal-LM loss is computed)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    logits = model(**inputs, use_cache=False).logits
    return answer_log_probs(logits, batch["labels"])


@dataclass
class DPOResult:
    loss: torch.Tensor  # scalar: mean DPO loss over pairs (+ the SFT term)
    losses: torch.Tensor  # the DPO term per pair, detached
    chosen_rewards: torch.Tensor  # beta * (log pi - log pi_ref), detached, per pair
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor  # policy log-probs, detached, per pair
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor  # answer tokens per chosen row


def dpo_loss(policy: AnswerLogProbs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", sft_weight: float = 0.0) -> DPOResult:
    """The DPO loss of a batch from the policy's answer log-probs and the reference's.

    sigmoid: -log sigmoid(beta * margin)  (DPO); hinge: relu(1 - beta * margin) (SLiC);
    ipo: ((chosen/n_chosen - rejected/n_rejected) log-ratios - 1/(2 beta))^2, log-ratios averaged per
    token as TRL does. `sft_weight` adds the mean negative log-likelihood of the chosen answers' tokens
    (RPO / MPO), TRL's `sft` loss.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {LOSS_TYPES}")
    chosen_logps, rejected_logps = policy.split()
    chosen_tokens, rejected_tokens = policy.tokens.chunk(2)
    chosen_ratio = chosen_logps - ref_chosen.to(chosen_logps)
    rejected_ratio = rejected_logps - ref_rejected.to(rejected_logps)
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    if sft_weight:
        loss = loss + sft_weight * (-chosen_logps.sum() / chosen_tokens.sum().clamp(min=1))
    return DPOResult(loss, losses.detach(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach(),
                     chosen_logps.detach(), rejected_logps.detach(), chosen_tokens)


def pair_figures(result: DPOResult) -> torch.Tensor:
    """One row per pair: the `FIGURES` (float64). Summed over pairs (and micro-batches and processes), then
    divided by the number of pairs, they give the logged means."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    return torch.stack([chosen, rejected, (chosen > rejected).float(), chosen - rejected, result.chosen_logps,
                        result.rejected_logps], dim=1).double()


def figure_means(sums: torch.Tensor, pairs: float, prefix: str = "") -> dict[str, float]:
    """Summed `pair_figures` rows -> {name: mean over pairs}."""
    return {prefix + name: (sums[i].item() / pairs if pairs else math.nan) for i, name in enumerate(FIGURES)}
