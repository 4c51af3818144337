"""Training recipes on a CPU with tiny models: each learns, freezes what it should, saves what reloads."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import required_flags, write_color_dataset
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.train import train as train_module
from llava_tiny.train.arguments import parse_args
from llava_tiny.train.trainer import LlavaTrainer, modality_grouped_indices


@pytest.fixture(scope="module")
def fixed_batch(tmp_path_factory):
    """Four samples trained as one fixed batch of four."""
    root = tmp_path_factory.mktemp("fixed")
    return {"data_path": write_color_dataset(str(root), n=4, seed=1), "image_folder": str(root)}


def run(tiny_parts, data, out, *flags, tower="clip"):
    argv = ["--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts[tower],
            "--data_path", data["data_path"], "--image_folder", data["image_folder"], "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", *map(str, flags)]
    train_module.train(argv=argv)
    return json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]


def losses(history):
    return [entry["loss"] for entry in history if "loss" in entry]


def test_stage1_trains_only_the_projector(tmp_path, tiny_parts, fixed_batch):
    history = run(tiny_parts, fixed_batch, tmp_path / "out", "--tune_mm_mlp_adapter", "True",
                  "--max_steps", "8", "--learning_rate", "1e-2", "--version", "plain")
    assert losses(history)[-1] < losses(history)[0]
    assert sorted(os.listdir(tmp_path / "out")).count("mm_projector.safetensors") == 1
    assert "model.safetensors" not in os.listdir(tmp_path / "out")
    trained = load_pretrained_model(str(tmp_path / "out"))
    base = assemble_model(tiny_parts["llm"], tiny_parts["clip"], version="plain")
    for part in ("language_model", "vision_tower"):
        for (name, p), (_, q) in zip(getattr(trained.model.model, part).named_parameters(),
                                     getattr(base.model.model, part).named_parameters()):
            assert torch.equal(p, q), f"{part}.{name} changed in stage 1"
    assert not torch.equal(trained.model.model.multi_modal_projector.linear_1.weight,
                           base.model.model.multi_modal_projector.linear_1.weight)


def test_full_finetuning_learns_and_reloads(tmp_path, tiny_parts, fixed_batch):
    history = run(tiny_parts, fixed_batch, tmp_path / "out", "--max_steps", "8", "--learning_rate", "3e-3")
    assert losses(history)[-1] < losses(history)[0] - 0.5
    assert losses(history)[0] == pytest.approx(torch.log(torch.tensor(926.0)).item(), abs=0.6)  # ~ln(vocab)
    reloaded = load_pretrained_model(str(tmp_path / "out"))
    assert reloaded.kind == "full"


@pytest.mark.parametrize("bits", [16, 4])
def test_lora_and_qlora_learn_and_touch_only_the_llm(tmp_path, tiny_parts, fixed_batch, bits):
    history = run(tiny_parts, fixed_batch, tmp_path / "out", "--lora_enable", "True", "--lora_r", "8",
                  "--lora_alpha", "16", "--bits", bits, "--max_steps", "8", "--learning_rate", "1e-2",
                  "--mm_projector_lr", "1e-2")
    assert losses(history)[-1] < losses(history)[0]
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert adapter and all("language_model" in k for k in adapter)
    extra = load_file(str(tmp_path / "out" / "non_lora_trainables.safetensors"))
    assert sorted(extra) == ["model.multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.weight",
                             "model.multi_modal_projector.linear_2.bias", "model.multi_modal_projector.linear_2.weight"]
    assert load_pretrained_model(str(tmp_path / "out")).kind == "lora"


def test_stage1_to_stage2_chain(tmp_path, tiny_parts, fixed_batch):
    run(tiny_parts, fixed_batch, tmp_path / "stage1", "--tune_mm_mlp_adapter", "True", "--max_steps", "3",
        "--learning_rate", "1e-2")
    # Stage 2 at learning rate 0: its projector must be exactly stage 1's.
    run(tiny_parts, fixed_batch, tmp_path / "stage2", "--pretrain_mm_mlp_adapter", str(tmp_path / "stage1"),
        "--lora_enable", "True", "--lora_r", "4", "--max_steps", "1", "--learning_rate", "0")
    stage1 = load_file(str(tmp_path / "stage1" / "mm_projector.safetensors"))
    stage2 = load_file(str(tmp_path / "stage2" / "non_lora_trainables.safetensors"))
    assert stage1.keys() == stage2.keys()
    for key in stage1:
        torch.testing.assert_close(stage1[key], stage2[key])


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_parts, color_data):
    """Loss = mean over the step's supervised tokens: 4 x 2 accumulated == 1 x 8 (SGD shows the gradient)."""
    common = ["--max_steps", "1", "--learning_rate", "0.5", "--optim", "sgd", "--lr_scheduler_type", "constant",
              "--weight_decay", "0", "--max_grad_norm", "0"]
    run(tiny_parts, color_data, tmp_path / "big", *common, "--per_device_train_batch_size", "8")
    run(tiny_parts, color_data, tmp_path / "acc", *common, "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "4")
    big = load_file(str(tmp_path / "big" / "model.safetensors"))
    acc = load_file(str(tmp_path / "acc" / "model.safetensors"))
    torch.manual_seed(0)  # train() seeds the projector's initialisation the same way
    assemble_model(tiny_parts["llm"], tiny_parts["clip"]).save_pretrained(str(tmp_path / "base"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))  # the same on-disk key names
    moved = [k for k in big if not torch.equal(big[k], base[k])]
    assert moved, "the step changed nothing"
    for key in big:
        torch.testing.assert_close(acc[key], big[key], atol=2e-6, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_parts, color_data):
    from llava_tiny.model.lora import apply_lora
    from llava_tiny.train.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same projector initialisation both times
        loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
        loaded.model.requires_grad_(False)
        loaded.model.model.multi_modal_projector.requires_grad_(True)
        model = apply_lora(loaded.model, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.02)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        data = LazySupervisedDataset(color_data["data_path"], loaded.tokenizer, loaded.image_processor, "llava_v1", 16,
                                     image_folder=color_data["image_folder"])
        batch = DataCollatorForSupervisedDataset(loaded.tokenizer.pad_token_id)([data[i] for i in range(4)])
        batch.pop("sample_ids")
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("projector" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_parts, color_data, monkeypatch):
    flags = ["--lora_enable", "True", "--lora_r", "4", "--max_steps", "6", "--learning_rate", "5e-3",
             "--save_strategy", "steps", "--save_steps", "3", "--per_device_train_batch_size", "2"]
    run(tiny_parts, color_data, tmp_path / "straight", *flags)

    real_step = LlavaTrainer.training_step

    def crash_at_step_5(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(LlavaTrainer, "training_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_parts, color_data, tmp_path / "resumed", *flags)
    assert os.path.isdir(tmp_path / "resumed" / "checkpoint-3")
    monkeypatch.setattr(LlavaTrainer, "training_step", real_step)
    run(tiny_parts, color_data, tmp_path / "resumed", *flags)  # the same command again

    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        a = load_file(str(tmp_path / "straight" / name))
        b = load_file(str(tmp_path / "resumed" / name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_output_dir_of_another_run_is_refused(tmp_path, tiny_parts, fixed_batch):
    run(tiny_parts, fixed_batch, tmp_path / "out", "--max_steps", "1", "--learning_rate", "1e-3")
    with pytest.raises(FileExistsError, match=r"holds a different run:\n  --learning_rate: 0.001"):
        run(tiny_parts, fixed_batch, tmp_path / "out", "--max_steps", "1", "--learning_rate", "2e-3")
    with pytest.raises(FileExistsError, match="holds a finished run"):
        run(tiny_parts, fixed_batch, tmp_path / "out", "--max_steps", "1", "--learning_rate", "1e-3")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not written by a llava-tiny run"):
        run(tiny_parts, fixed_batch, tmp_path / "mine", "--max_steps", "1")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_overwrite_output_dir_sets_the_old_run_aside(tmp_path, tiny_parts, fixed_batch):
    out = tmp_path / "out"
    run(tiny_parts, fixed_batch, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
        "--learning_rate", "1e-3")
    old_weights = (out / "model.safetensors").read_bytes()
    history = run(tiny_parts, fixed_batch, out, "--max_steps", "1", "--learning_rate", "2e-3",
                  "--overwrite_output_dir", "True")
    assert [e["step"] for e in history if "loss" in e] == [1]  # started over, did not resume from checkpoint-2
    aside = out / "previous-run-1"
    assert (aside / "model.safetensors").read_bytes() == old_weights  # nothing deleted
    assert (aside / "checkpoint-2").is_dir() and not (out / "checkpoint-2").exists()


def test_llava_flags_are_accepted(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    model_args, data_args, args = parse_args([
        *required_flags(tmp_path), "--version", "v1",
        "--evaluation_strategy", "no", "--local_rank", "0", "--bf16", "True", "--tf32", "True",
        "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--lazy_preprocess", "True",
        "--group_by_modality_length", "True", "--report_to", "wandb", "--mm_projector_lr", "2e-5",
        "--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--warmup_ratio", "0.03"])
    assert args.eval_strategy == "no" and args.warmup_steps == 0.03 and not args.bf16 and args.use_cpu
    assert args.mm_projector_lr == 2e-5 and args.lora_r == 128 and args.group_by_modality_length
    assert "wandb" not in args.report_to or os.environ.get("WANDB_MODE") == "offline"
    with pytest.raises(ValueError, match="LLaVA-1.0 options"):
        parse_args([*required_flags(tmp_path), "--mm_use_im_start_end", "True"])
    # transformers 5 dropped --group_by_length; LLaVA scripts still pass it (bare or with a value).
    for flag in (["--group_by_length"], ["--group_by_length", "True"], ["--group_by_length=true"]):
        _, _, args = parse_args([*required_flags(tmp_path), *flag])
        assert args.train_sampling_strategy == "group_by_length"
    _, _, args = parse_args([*required_flags(tmp_path), "--group_by_length", "False"])
    assert args.train_sampling_strategy != "group_by_length"


def test_modality_grouping_with_one_modality_and_mixed():
    generator = torch.Generator().manual_seed(0)
    assert sorted(modality_grouped_indices([5, 7, 3, 9, 2], 2, generator)) == [0, 1, 2, 3, 4]
    assert sorted(modality_grouped_indices([-5, -7, -3], 2, generator)) == [0, 1, 2]
    mixed = [4, -3, 5, -6, 7, -2, 8, -1]
    order = modality_grouped_indices(mixed, 2, generator)
    for start in range(0, 8, 2):
        signs = {mixed[i] > 0 for i in order[start:start + 2]}
        assert len(signs) == 1


def test_text_only_batches_train_alongside_images(tmp_path, tiny_parts, color_data):
    history = run(tiny_parts, color_data, tmp_path / "out", "--max_steps", "6", "--learning_rate", "1e-3",
                  "--group_by_modality_length", "True", "--per_device_train_batch_size", "2")
    assert len(losses(history)) == 6 and all(l == l for l in losses(history))


def test_parameter_counts_hold_when_zero3_partitions_the_frozen_weights(tiny_parts):
    """What a ZeRO-3 rank holds after `zero.Init` (peer: DeepSpeed's partitioned parameter, an empty tensor with its
    full size in `ds_numel`): the recipe's "N of M parameters trainable" is the unpartitioned model's, not 100%."""
    from transformers import AutoModelForCausalLM

    from llava_tiny.model.lora import apply_lora
    from llava_tiny.train.recipes import parameter_counts

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_parts["llm"]), r=4, alpha=8)
    whole = parameter_counts(model)
    for param in model.parameters():
        if not param.requires_grad:  # the adapters are added after partitioning: whole on every rank
            param.ds_numel = param.numel()
            param.data = torch.empty(0, dtype=param.dtype)
    assert parameter_counts(model) == whole and 0 < whole[0] < whole[1]


def test_the_recipe_registry_picks_the_one_recipe_each_flag_combination_asks_for():
    """`make_recipe` asks every registered recipe's `selected_by` (no list of names beside the registry): each
    combination selects one recipe; a recipe registered later is picked by its own rule, over the recipe it
    refines; rules that overlap otherwise are an error that names the recipes."""
    from types import SimpleNamespace

    from llava_tiny.train.recipes import RECIPES, FullFinetune, Recipe, make_recipe, register

    def pick(tune=False, lora=False, bits=16, **extra):
        return make_recipe(SimpleNamespace(tune_mm_mlp_adapter=tune),
                           SimpleNamespace(lora_enable=lora, bits=bits, **extra)).name

    assert [pick(tune=True), pick(), pick(lora=True), pick(lora=True, bits=4), pick(lora=True, bits=8)] == \
        ["projector", "full", "lora", "qlora", "qlora"]

    @register("full_with_ema")
    class FullWithEma(FullFinetune):
        @staticmethod
        def selected_by(model_args, training_args) -> bool:
            return FullFinetune.selected_by(model_args, training_args) and getattr(training_args, "ema", False)

    @register("anything_with_swa")
    class AnythingWithSwa(Recipe):
        @staticmethod
        def selected_by(model_args, training_args) -> bool:
            return getattr(training_args, "swa", False)

    try:
        assert pick(ema=True) == "full_with_ema" and pick(ema=False) == "full"
        assert pick(lora=True, ema=True) == "lora"
        with pytest.raises(ValueError, match=r"select 2 training recipes \(full, anything_with_swa\)"):
            pick(swa=True)
    finally:
        del RECIPES["full_with_ema"], RECIPES["anything_with_swa"]
