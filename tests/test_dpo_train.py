"""DPO runs on a CPU with tiny models: LoRA (reference = adapters off), full (frozen copy) and precomputed
reference log-probs; the figures TRL logs; checkpoints of the recipe's kind that load and generate;
an interrupted run resumes to the same weights; flags checked at once."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import required_flags
from dpo_data import write_preference_dataset
from llava_tiny.conversation import tokenize_prompt
from llava_tiny.model.builder import load_pretrained_model
from llava_tiny.train.arguments import FlagError, parse_args
from llava_tiny.train.dpo_trainer import REF_LOG_PROBS_FILE, DPOTrainer
from llava_tiny.train.train import run as run_trainer
from llava_tiny.train.train_dpo import DPOTrainingArguments, build_dpo_trainer, train_dpo

LN2 = torch.tensor(math.log(2)).item()
LORA = ["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--freeze_mm_mlp_adapter", "True"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"data_path": write_preference_dataset(root, n=8, text_only=0, seed=2), "image_folder": str(root)}


def argv(tiny_parts, data, out, *flags):
    return ["--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts["clip"], "--version", "v1",
            "--data_path", data["data_path"], "--image_folder", data["image_folder"], "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0", *map(str, flags)]


def history(out):
    return json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]


class ReferenceWatch(TrainerCallback):
    """Records the reference log-probs of one fixed batch at every step."""

    def __init__(self, trainer, batch):
        self.trainer, self.batch, self.seen = trainer, batch, []

    def on_step_end(self, args, state, control, **kwargs):
        batch = dict(self.batch)
        pair_index = batch.pop("pair_index")
        self.seen.append(torch.cat(self.trainer.reference_log_probs(batch, pair_index)))


def build(tiny_parts, data, out, *flags):
    args = parse_args(argv(tiny_parts, data, out, *flags), DPOTrainingArguments)
    trainer = build_dpo_trainer(args)
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k not in ("sample_ids", "skipped_samples")}
    return trainer, batch


def test_lora_starts_at_ln2_keeps_its_reference_and_learns_the_preference(tmp_path, tiny_parts, pairs):
    out = tmp_path / "lora"
    trainer, batch = build(tiny_parts, pairs, out, *LORA, "--max_steps", "12", "--learning_rate", "2e-2",
                           "--eval_data_path", pairs["data_path"], "--eval_strategy", "steps", "--eval_steps", "6")
    trainer.model.train()
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == LN2  # policy == reference, exactly
    watch = ReferenceWatch(trainer, batch)
    trainer.add_callback(watch)
    run_trainer(trainer)

    assert len(watch.seen) == 12 and all(torch.equal(s, watch.seen[0]) for s in watch.seen)
    logs = [h for h in history(out) if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert logs[0]["rewards/chosen"] == logs[0]["rewards/rejected"] == logs[0]["rewards/margins"] == 0.0
    assert logs[0]["rewards/accuracies"] == 0.0  # a tie is not a win (as TRL)
    for name in ("logps/chosen", "logps/rejected"):
        assert logs[0][name] < 0
    last = logs[-4:]  # the preference is learnt: chosen answers gain on rejected ones
    assert sum(h["rewards/accuracies"] for h in last) / 4 >= 0.75 and min(h["rewards/margins"] for h in last) > 0.05
    assert max(h["loss"] for h in last) < LN2 - 0.03
    evals = [h for h in history(out) if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1]["eval_pairs"] == 8
    assert evals[-1]["eval_rewards/accuracies"] >= 0.75 and evals[-1]["eval_loss"] < LN2 - 0.03

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("language_model" in k for k in adapter)
    assert sorted(load_file(str(out / "non_lora_trainables.safetensors"))) == []  # the projector stayed frozen
    loaded = load_pretrained_model(str(out))
    assert loaded.kind == "lora"
    ids = torch.tensor([tokenize_prompt("What color is the image?", loaded.tokenizer, loaded.template, 16)])
    assert loaded.model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape[1] > ids.shape[1]


def test_full_finetuning_uses_a_frozen_copy_and_saves_a_full_checkpoint(tmp_path, tiny_parts, pairs):
    out = tmp_path / "full"
    trainer, batch = build(tiny_parts, pairs, out, "--max_steps", "4", "--learning_rate", "5e-3",
                           "--dpo_loss", "ipo", "--dpo_sft_weight", "0.1")
    reference = trainer.reference_model
    assert reference is not None and reference is not trainer.model
    assert not any(p.requires_grad for p in reference.parameters())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    run_trainer(trainer)
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert load_pretrained_model(str(out)).kind == "full"
    trained = load_file(str(out / "model.safetensors"))
    changed = [k for k, v in trained.items() if k in before and not torch.equal(v, before[k])]
    assert any("language_model" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert history(out)[-1]["train_loss"] > 0


def test_precomputed_reference_log_probs_equal_the_live_reference_and_are_kept(tmp_path, tiny_parts, pairs):
    # LoRA with a trainable projector: allowed once the reference is precomputed.
    flags = ["--lora_enable", "True", "--lora_r", "8", "--max_steps", "3", "--learning_rate", "1e-2",
             "--precompute_ref_log_probs", "True"]
    trainer, batch = build(tiny_parts, pairs, tmp_path / "pre", *flags)
    assert trainer.reference_model is None
    live = torch.cat(trainer.reference_log_probs(dict(batch), batch["pair_index"]))
    run_trainer(trainer)
    table = json.load(open(tmp_path / "pre" / REF_LOG_PROBS_FILE))
    assert len(table["train"]["ids"]) == 8 and not any(math.isnan(x) for x in table["train"]["chosen"])
    stored = torch.cat(trainer.reference_log_probs(dict(batch), batch["pair_index"]))
    torch.testing.assert_close(stored, live, atol=1e-5, rtol=1e-5)
    assert history(tmp_path / "pre")[0]["loss"] == pytest.approx(LN2, abs=1e-4)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_parts, pairs, monkeypatch):
    flags = [*LORA, "--max_steps", "6", "--learning_rate", "5e-3", "--save_strategy", "steps", "--save_steps", "3",
             "--per_device_train_batch_size", "2", "--precompute_ref_log_probs", "True"]
    train_dpo(None, argv(tiny_parts, pairs, tmp_path / "straight", *flags))
    real_step = DPOTrainer.training_step

    def crash_at_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "training_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(None, argv(tiny_parts, pairs, tmp_path / "resumed", *flags))
    assert os.path.isdir(tmp_path / "resumed" / "checkpoint-3")
    monkeypatch.setattr(DPOTrainer, "training_step", real_step)
    train_dpo(None, argv(tiny_parts, pairs, tmp_path / "resumed", *flags))  # the same command again
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    assert history(tmp_path / "resumed")[-1]["step"] == 6


def test_dpo_flags_are_checked_at_once(tmp_path):
    flags = [*required_flags(tmp_path), "--dpo_loss", "kto", "--dpo_beta", "0", "--dpo_sft_weight", "-1",
             "--packing", "True", "--lora_enable", "True", "--data_path", str(tmp_path / "missing.json")]
    with pytest.raises(FlagError) as err:
        parse_args(flags, DPOTrainingArguments)
    message = str(err.value)
    for expected in ("--dpo_loss 'kto'", "--dpo_beta 0", "--dpo_sft_weight -1", "--packing is not used by DPO",
                     "add --freeze_mm_mlp_adapter True", "--data_path"):
        assert expected in message, expected
    with pytest.raises(ValueError, match="--dpo_beta"):  # the SFT entry point has no DPO flags
        parse_args([*required_flags(tmp_path), "--dpo_beta", "0.2"])


@pytest.mark.parametrize("sft", ["lora", "full"])
def test_dpo_starts_from_a_fine_tuned_folder_and_its_checkpoint_reloads_on_it(tmp_path, tiny_parts, pairs, sft):
    from llava_tiny.train import train as train_module

    sft_flags = ["--lora_enable", "True", "--lora_r", "4"] if sft == "lora" else []
    sft_argv = argv(tiny_parts, pairs, tmp_path / "sft", *sft_flags, "--max_steps", "2", "--learning_rate", "1e-2")
    sft_argv[sft_argv.index("--data_path") + 1] = os.path.join(pairs["image_folder"], "data.json")
    train_module.train(argv=sft_argv)
    # DPO at learning rate 0 from the SFT folder: its LoRA checkpoint must reload as exactly the SFT model.
    dpo_argv = argv(tiny_parts, pairs, tmp_path / "dpo", *LORA, "--max_steps", "1", "--learning_rate", "0")
    dpo_argv[1], dpo_argv[2:4] = str(tmp_path / "sft"), []  # --model_name_or_path SFT, no --vision_tower
    train_dpo(None, dpo_argv)
    first = history(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    a, b = load_pretrained_model(str(tmp_path / "sft")), load_pretrained_model(str(tmp_path / "dpo"))
    assert b.kind == "lora"
    ids = torch.tensor([tokenize_prompt("What color is the image?", a.tokenizer, a.template, 16)])
    torch.testing.assert_close(b.model(input_ids=ids).logits, a.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_qlora_dpo_reference_is_the_quantized_model_with_adapters_off(tmp_path, tiny_parts, pairs):
    out = tmp_path / "qlora"
    trainer, batch = build(tiny_parts, pairs, out, *LORA, "--bits", "4", "--max_steps", "2", "--learning_rate", "1e-2")
    trainer.model.train()
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == LN2
    run_trainer(trainer)
    assert load_pretrained_model(str(out)).kind == "lora"
    assert history(out)[0]["rewards/margins"] == 0.0


def test_a_nan_dpo_loss_stops_before_anything_is_applied_naming_the_pairs(tmp_path, tiny_parts, pairs):
    from llava_tiny.train.callbacks import NonFiniteLossError

    trainer, batch = build(tiny_parts, pairs, tmp_path / "nan", "--max_steps", "2", "--learning_rate", "1e-2")
    with torch.no_grad():
        trainer.model.model.multi_modal_projector.linear_1.weight[0, 0] = float("inf")
    trainer.model.train()
    inputs = {**batch, "sample_ids": ["img-a", "img-b"]}
    with pytest.raises(NonFiniteLossError, match=r"step 1: the training loss is nan for samples \['img-a', 'img-b'\]"):
        trainer.compute_loss(trainer.model, inputs)


def test_dpo_has_no_sft_batching_flags_so_they_are_unknown_there(tmp_path):
    """--packing and --chunked_ce are train.py's: not fields of DPO's flags (nothing to reject after parsing), so
    train_dpo.py refuses them as it refuses any flag it does not have; every other train.py flag is DPO's too."""
    import dataclasses

    from llava_tiny.train.arguments import TrainingArguments

    sft = {f.name for f in dataclasses.fields(TrainingArguments)}
    dpo = {f.name for f in dataclasses.fields(DPOTrainingArguments)}
    assert sft - dpo == {"packing", "chunked_ce"}
    with pytest.raises(FlagError) as err:
        parse_args([*required_flags(tmp_path), "--packing", "True", "--chunked_ce=True"], DPOTrainingArguments)
    message = str(err.value)
    for flag in ("--packing", "--chunked_ce"):
        assert f"{flag} is not used by DPO: unknown flag" in message, message
