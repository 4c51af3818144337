"""The DPO loss and its logged figures equal TRL's (trl.DPOTrainer, the test oracle) on the same batch."""
import copy
import math

import pytest
import torch

from llava_tiny.conversation import IGNORE_INDEX
from llava_tiny.train.dpo import AnswerLogProbs, answer_log_probs, dpo_loss, figure_means, pair_figures

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = [("What color is the sky?", "blue", "green"), ("Name a shape.", "a circle", "red red red"),
         ("Count to two.", "one two", "three"), ("Say yes.", "yes", "no thanks, I will not")]


@pytest.fixture
def models(tiny_parts):  # fresh per test: TRL patches the models it is given
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"], dtype=torch.float32)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy: rewards are not all zero
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts["llm"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    return policy.eval(), reference.eval(), tokenizer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_figures_equal_trl(tmp_path, models, loss_type):
    policy, reference, tokenizer = models
    data = datasets.Dataset.from_list([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS])
    config = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], per_device_train_batch_size=4,
                           report_to=[], use_cpu=True, max_length=None)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=data,
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    trl_figures = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # Ours, on the same token ids: labels = the completion tokens (TRL's completion_mask).
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = answer_log_probs(policy(**inputs).logits, labels)
        ref = answer_log_probs(reference(**inputs).logits, labels)
    ref_chosen, ref_rejected = ref.split()
    result = dpo_loss(ours, ref_chosen, ref_rejected, beta=0.3, loss_type=loss_type)
    rows = pair_figures(result)
    figures = figure_means(rows.sum(0), len(rows))

    assert result.loss.item() == pytest.approx(trl_loss, abs=1e-5)
    for name, value in figures.items():
        assert value == pytest.approx(trl_figures[name], abs=1e-5), name
    assert abs(figures["rewards/margins"]) > 1e-3  # the oracle compares something


def test_sft_term_is_trls_sft_loss_and_policy_equal_to_reference_gives_ln2():
    logps = AnswerLogProbs(torch.tensor([-3.0, -5.0, -4.0, -7.0]), torch.tensor([3, 2, 4, 1]))
    chosen, rejected = logps.split()
    plain = dpo_loss(logps, chosen, rejected, beta=0.1)
    assert plain.loss.item() == torch.tensor(math.log(2)).item()  # exactly (float32): the policy is the reference
    with_sft = dpo_loss(logps, chosen, rejected, beta=0.1, sft_weight=0.5)
    # TRL's "sft" loss: mean negative log-prob over the chosen answers' tokens.
    assert with_sft.loss.item() == pytest.approx(math.log(2) + 0.5 * (3.0 + 5.0) / (3 + 2), abs=1e-6)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(logps, chosen, rejected, loss_type="kto")
