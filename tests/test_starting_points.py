"""Starting points: what users have, told apart by files and config. The folders that stand for
them (a stock transformers LLaVA, a folder in LLaVA's own layout) are written with stock
transformers, torch and safetensors only, never with this project's code."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

from llava_tiny.convert_bin import main as convert_bin
from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch
from llava_tiny.model.builder import load_pretrained_model
from llava_tiny.train import train as train_module
from llava_tiny.train.arguments import FlagError
from test_deepspeed import ROOT, _free_port

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llama2-tokenizer")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)


def _tokenizer(with_image: bool):
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    tokenizer.pad_token = tokenizer.unk_token
    if with_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def _image_processor():
    return CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


@pytest.fixture(scope="module")
def stock_llava(tmp_path_factory):
    """What `llava-hf/*` users have: a stock `LlavaForConditionalGeneration` folder with its processor (a small
    tower, 4 tokens per image, under the config's default `image_seq_length` 576, as stock writes it)."""
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("stock") / "llava")
    tokenizer = _tokenizer(with_image=True)
    config = LlavaConfig(text_config=LlamaConfig(vocab_size=len(tokenizer), **TEXT),
                         vision_config=CLIPVisionConfig(**VISION), image_token_index=len(tokenizer) - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    assert config.image_seq_length == 576  # stock's default, whatever the tower: its processor counts from sizes
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(image_processor=_image_processor(), tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def original_llava(tmp_path_factory):
    """A folder as haotian-liu/LLaVA writes it: `llava_llama` config, Llama weight names plus
    `model.mm_projector.{0,2}`, the tower named by `mm_vision_tower` (a stock CLIP folder)."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("original")
    tower = str(root / "clip")
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tower)
    _image_processor().save_pretrained(tower)
    folder = str(root / "llava")
    tokenizer = _tokenizer(with_image=False)  # LLaVA marks images with an id outside the vocabulary
    text = LlamaConfig(vocab_size=len(tokenizer), **TEXT)
    state = {k: v.contiguous() for k, v in LlamaForCausalLM(text).state_dict().items()}
    state.update({"model.mm_projector.0.weight": torch.randn(32, 32), "model.mm_projector.0.bias": torch.randn(32),
                  "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32)})
    os.makedirs(folder)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = {**text.to_dict(), "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": tower, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
              "image_aspect_ratio": "pad"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.save_pretrained(folder)
    return {"folder": folder, "tower": tower, "state": state}


def _train(start, data, out, *flags):
    argv = ["--model_name_or_path", start, "--data_path", data["data_path"], "--image_folder", data["image_folder"],
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0", *map(str, flags)]
    train_module.train(argv=argv)
    with open(os.path.join(out, "trainer_state.json")) as f:
        return [e["loss"] for e in json.load(f)["log_history"] if "loss" in e]


def test_a_stock_llava_folder_trains_with_nothing_reinitialised(tmp_path, stock_llava, color_data):
    _train(stock_llava, color_data, tmp_path / "same", "--max_steps", "1", "--learning_rate", "0")
    start, saved = load_file(os.path.join(stock_llava, "model.safetensors")), load_file(
        str(tmp_path / "same" / "model.safetensors"))
    assert saved.keys() == start.keys()
    changed = [k for k in start if not torch.equal(start[k], saved[k])]
    assert not changed, f"re-initialised or changed at learning rate 0: {changed[:5]}"
    assert json.load(open(tmp_path / "same" / "config.json"))["image_seq_length"] == 4  # counted from the tower
    losses = _train(stock_llava, color_data, tmp_path / "learns", "--max_steps", "6", "--learning_rate", "3e-3")
    assert losses[-1] < losses[0] - 0.5
    # This project's own full output is a starting point too: again nothing moves at learning rate 0.
    _train(str(tmp_path / "learns"), color_data, tmp_path / "again", "--max_steps", "1", "--learning_rate", "0")
    first, second = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("learns", "again"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_llavas_own_layout_is_mapped_as_transformers_maps_it(tmp_path, original_llava, color_data):
    _train(original_llava["folder"], color_data, tmp_path / "out", "--max_steps", "1", "--learning_rate", "0",
           "--version", "v1")
    saved, state = load_file(str(tmp_path / "out" / "model.safetensors")), original_llava["state"]
    for layer in (0, 2):
        for kind in ("weight", "bias"):
            assert torch.equal(saved[f"model.multi_modal_projector.linear_{layer // 2 + 1}.{kind}"],
                               state[f"model.mm_projector.{layer}.{kind}"])
    assert torch.equal(saved["model.language_model.layers.1.mlp.up_proj.weight"], state["model.layers.1.mlp.up_proj.weight"])
    vocab = state["model.embed_tokens.weight"].shape[0]  # <image> was added after it
    assert torch.equal(saved["model.language_model.embed_tokens.weight"][:vocab], state["model.embed_tokens.weight"])
    tower = load_file(os.path.join(original_llava["tower"], "model.safetensors"))
    fc1 = "encoder.layers.0.mlp.fc1.weight"  # CLIP's key prefix differs between stock layouts; the tensor must not
    assert torch.equal(next(v for k, v in saved.items() if k.startswith("model.vision_tower") and k.endswith(fc1)),
                       next(v for k, v in tower.items() if k.endswith(fc1)))
    assert load_pretrained_model(original_llava["folder"], device="cpu").kind == "llava_original"


def test_a_bin_only_llava_folder_is_refused_with_the_command_and_the_conversion_loads(tmp_path, original_llava):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    for name in os.listdir(original_llava["folder"]):
        if name != "model.safetensors":
            shutil.copy(os.path.join(original_llava["folder"], name), folder / name)
    torch.save(original_llava["state"], folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled weights .*convert_bin_to_safetensors.py"):
        load_pretrained_model(str(folder), device="cpu")
    assert convert_bin([str(folder), str(tmp_path / "converted")]) == 0
    loaded = load_pretrained_model(str(tmp_path / "converted"), device="cpu")
    assert loaded.kind == "llava_original"
    assert torch.equal(loaded.model.model.multi_modal_projector.linear_2.weight,
                       original_llava["state"]["model.mm_projector.2.weight"])


def test_a_tower_that_is_not_the_checkpoints_own_is_refused(tmp_path, stock_llava, tiny_parts, color_data):
    with pytest.raises(FlagError, match=r"--vision_tower .* is not the tower of .*differs in .*Omit --vision_tower"):
        _train(stock_llava, color_data, tmp_path / "out", "--vision_tower", tiny_parts["siglip"], "--max_steps", "1")
    assert not (tmp_path / "out").exists()


def test_a_folder_with_nothing_loadable_says_what_it_found(tmp_path, color_data):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no model here")
    with pytest.raises(FlagError, match=r"holds no model: expected model.safetensors .* found \['notes.txt'\]"):
        _train(str(tmp_path / "empty"), color_data, tmp_path / "out", "--max_steps", "1")


@pytest.fixture(scope="module")
def original_llava_lora(tmp_path_factory, original_llava):
    """LLaVA's own LoRA output, as pickles: adapter_model.bin (peft on the bare Llama names),
    non_lora_trainables.bin (`base_model.model.model.mm_projector.*`), a `llava_llama` config."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    root = tmp_path_factory.mktemp("original_lora")
    base, folder = str(root / "vicuna"), str(root / "lora")
    tokenizer = _tokenizer(with_image=False)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TEXT)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8,
                                                                                   target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(folder, safe_serialization=False)
    projector = {f"base_model.model.model.mm_projector.{i}.{kind}": torch.randn(32, 32) if kind == "weight"
                 else torch.randn(32) for i in (0, 2) for kind in ("weight", "bias")}
    torch.save(projector, os.path.join(folder, "non_lora_trainables.bin"))
    config = json.load(open(os.path.join(original_llava["folder"], "config.json")))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tokenizer.save_pretrained(folder)
    return {"folder": folder, "merged": peft_model.merge_and_unload(), "projector": projector}


def test_llavas_own_lora_output_is_refused_as_pickles_then_loads_converted_and_merged(tmp_path, original_llava_lora):
    with pytest.raises(ValueError, match="only pickled weights .*convert_bin_to_safetensors.py"):
        load_pretrained_model(original_llava_lora["folder"], device="cpu")
    assert convert_bin([original_llava_lora["folder"], str(tmp_path / "converted")]) == 0
    loaded = load_pretrained_model(str(tmp_path / "converted"), device="cpu")
    assert loaded.kind == "lora"
    assert torch.equal(loaded.model.model.multi_modal_projector.linear_2.bias,
                       original_llava_lora["projector"]["base_model.model.model.mm_projector.2.bias"])
    ids = torch.tensor([[1, 450, 4996, 17354, 1701]])
    with torch.no_grad():
        expected = original_llava_lora["merged"].eval()(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits[..., :expected.shape[-1]]  # <image> was added after the vocabulary
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_lora_folder_of_this_project_is_merged_then_trained_further(tmp_path, tiny_parts, color_data):
    argv = ["--vision_tower", tiny_parts["clip"], "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
            "--max_steps", "3", "--learning_rate", "1e-2"]
    _train(tiny_parts["llm"], color_data, tmp_path / "lora", *argv)
    _train(str(tmp_path / "lora"), color_data, tmp_path / "more", "--max_steps", "1", "--learning_rate", "0")
    merged = load_pretrained_model(str(tmp_path / "lora"), device="cpu").model.state_dict()
    saved = load_file(str(tmp_path / "more" / "model.safetensors"))
    assert set(saved) <= set(merged) and len(saved) > 40  # a tied lm_head is saved once
    assert all(torch.equal(saved[k], merged[k]) for k in saved)


@pytest.mark.slow
def test_the_seed_command_from_a_llava_folder_runs_zero3_lora_on_two_processes(tmp_path, stock_llava, color_data):
    """LLaVA users' command with a finished LLaVA as --model_name_or_path and --version v1 (no --vision_tower):
    DeepSpeed ZeRO-3 + LoRA, two CPU processes, to the end; the checkpoint reloads and answers."""
    out = tmp_path / "out"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()), "llava_tiny/train/train_mem.py",
           "--deepspeed", "zero_configs/zero3.json", "--model_name_or_path", stock_llava, "--version", "v1",
           "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-3",
           "--data_path", color_data["data_path"], "--image_folder", color_data["image_folder"],
           "--bf16", "True", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
           "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "2e-3", "--logging_steps", "1",
           "--report_to", "none", "--dataloader_num_workers", "0"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    loaded = load_pretrained_model(str(out), device="cpu")
    assert loaded.kind == "lora" and loaded.template == "vicuna_v1"
    prompt = build_prompt(loaded, "<image>\nWhat color is the image?", [Image.new("RGB", (30, 30), (200, 20, 20))])
    assert isinstance(generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=3))[0], str)


def test_a_hub_id_in_the_cache_is_told_apart_by_its_files(tmp_path, stock_llava):
    """A `llava-hf/*`-style id resolved from the hub cache (offline, as huggingface_hub lays the cache out) is the
    LLaVA it holds, for serving and export as for training; not "a text model" because it is not a local folder."""
    from llava_tiny.model.builder import load_checkpoint

    snapshot = tmp_path / "cache" / "models--llava-hf--tiny-llava" / "snapshots" / ("0" * 40)
    shutil.copytree(stock_llava, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    loaded = load_checkpoint("llava-hf/tiny-llava", cache_dir=str(tmp_path / "cache"))
    assert loaded.kind == "full" and loaded.model.config.image_seq_length == 4
    start = load_file(os.path.join(stock_llava, "model.safetensors"))
    weights = loaded.model.state_dict()
    assert torch.equal(weights["model.multi_modal_projector.linear_1.weight"],
                       start["multi_modal_projector.linear_1.weight"])
