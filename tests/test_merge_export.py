"""Merging LoRA, exporting to the stock LLaVA layout, and converting pickled weights safely."""
import json
import os
import pickle
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

from llava_tiny.images import image_settings, preprocess_images
from llava_tiny.inference import build_prompt, probe_inputs
from llava_tiny.model import unwrap_model
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.model.checkpoint_kinds import LORA, PROJECTOR
from llava_tiny.model.checkpoints import save_checkpoint
from llava_tiny.model.lora import apply_lora

from llava_tiny import convert_bin as convert_bin_to_safetensors
from llava_tiny import export as export_tools

IMAGE = Image.new("RGB", (70, 56), (200, 30, 30))
QUESTION = "What color is it?"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_parts):
    """A LoRA checkpoint whose adapters matter: B matrices set to nonzero values (nothing trained)."""
    torch.manual_seed(0)
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    model = loaded.model
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)  # the LoRA recipe: projector trained in full
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    path = str(tmp_path_factory.mktemp("lora") / "lora")
    save_checkpoint(LORA, peft_model, loaded.processor, path)
    return path


def _stock_generate(path, max_new_tokens=8):
    """Tokens a plain-transformers user gets: stock model class, stock processor, its chat template."""
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model) is LlavaForConditionalGeneration
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inputs = processor(images=IMAGE, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs["input_ids"], out[:, inputs["input_ids"].shape[1]:]


def _project_generate(loaded, input_ids, max_new_tokens=8):
    prompt = build_prompt(loaded, f"<image>\n{QUESTION}", [IMAGE])
    assert [prompt.input_ids] == input_ids.tolist()  # the stock processor built the training prompt
    # As the project prepares an image (the model's recorded aspect mode; IMAGE is not square).
    pixels = preprocess_images([IMAGE], loaded.image_processor, *image_settings(unwrap_model(loaded.model).config))
    with torch.no_grad():
        out = loaded.model.generate(input_ids=input_ids, pixel_values=pixels, max_new_tokens=max_new_tokens,
                                    do_sample=False)
    return out[:, input_ids.shape[1]:]


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(**probe_inputs(loaded)).logits


def test_merged_lora_loads_in_stock_llava_and_generates_like_the_unmerged_model(lora_dir, tiny_parts, tmp_path):
    unmerged = load_pretrained_model(lora_dir, device="cpu", merge_lora=False)
    assert type(unmerged.model).__name__ == "PeftModelForCausalLM"
    base = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    base.model.model.multi_modal_projector = unwrap_model(unmerged.model).model.multi_modal_projector
    assert (_logits(unmerged) - _logits(base)).abs().max() > 1e-2  # the adapter changes the model

    merged = tmp_path / "merged"
    assert export_tools.merge_main(["--model-path", lora_dir, "--save-path", str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "llava" and config["dtype"] == "float32"
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(merged))
    assert not any("lora" in k for k in load_file(str(merged / "model.safetensors")))

    input_ids, stock_tokens = _stock_generate(str(merged))
    assert torch.equal(stock_tokens, _project_generate(unmerged, input_ids))
    reloaded = load_pretrained_model(str(merged), device="cpu")
    torch.testing.assert_close(_logits(reloaded), _logits(unmerged), atol=1e-4, rtol=0)


def test_merge_refuses_a_non_empty_save_path_and_non_lora_checkpoints(lora_dir, tiny_parts, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("earlier work")
    assert export_tools.merge_main(["--model-path", lora_dir, "--save-path", str(taken)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert os.listdir(taken) == ["keep.txt"]

    full = tmp_path / "full"
    assemble_model(tiny_parts["llm"], tiny_parts["clip"]).save_pretrained(str(full))
    assert export_tools.merge_main(["--model-path", str(full), "--save-path", str(tmp_path / "out")]) == 2
    assert "is a full checkpoint, not a LoRA one" in capsys.readouterr().err


def test_merge_fails_loudly_when_merged_logits_differ(lora_dir, tmp_path, monkeypatch, capsys):
    from peft.tuners.lora import LoraModel

    # A broken merge: adapters removed instead of folded into the weights.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *args, **kwargs: self.unload())
    out = tmp_path / "merged"
    assert export_tools.merge_main(["--model-path", lora_dir, "--save-path", str(out)]) == 1
    err = capsys.readouterr().err
    assert "merged and unmerged logits differ by" in err and "nothing was written" in err
    assert not out.exists()


def test_export_of_a_lora_checkpoint_is_stock_and_generates_like_the_project_loader(lora_dir, tmp_path, capsys):
    export = tmp_path / "export"
    assert export_tools.export_main(["--model-path", lora_dir, "--save-path", str(export)]) == 0
    assert "stock transformers LLaVA layout; reloaded logits match" in capsys.readouterr().out
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    input_ids, stock_tokens = _stock_generate(str(export))
    ours = load_pretrained_model(lora_dir, device="cpu")
    assert torch.equal(stock_tokens, _project_generate(ours, input_ids))


def test_export_in_bfloat16_and_from_a_projector_checkpoint(tiny_parts, tmp_path):
    torch.manual_seed(2)
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    save_checkpoint(PROJECTOR, loaded.model, loaded.processor, str(tmp_path / "stage1"))
    result = export_tools.export_checkpoint(str(tmp_path / "stage1"), str(tmp_path / "export"), save_dtype="bfloat16")
    assert result["kind"] == "projector" and result["stock"] and result["max_difference"] is not None
    assert {t.dtype for t in load_file(str(tmp_path / "export" / "model.safetensors")).values()} == {torch.bfloat16}
    stock = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "export"))
    assert stock.dtype == torch.bfloat16
    torch.testing.assert_close(stock.model.multi_modal_projector.linear_1.weight.float(),
                               loaded.model.model.multi_modal_projector.linear_1.weight.to(torch.bfloat16).float())


def test_export_of_a_non_stock_projector_says_so_and_keeps_llava_tiny(tiny_parts, tmp_path, caplog, capsys):
    full = tmp_path / "linear"
    assemble_model(tiny_parts["llm"], tiny_parts["clip"], mm_projector_type="linear").save_pretrained(str(full))
    assert export_tools.export_main(["--model-path", str(full), "--save-path", str(tmp_path / "export")]) == 0
    assert "'linear' cannot be expressed by stock transformers LLaVA" in caplog.text
    assert "NOT loadable by stock transformers LLaVA" in capsys.readouterr().out
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "llava_tiny"


# --- .bin -> safetensors ---------------------------------------------------------------------------

def _clip_checkpoint(folder):
    """An old-style CLIP folder: pytorch_model.bin (torch.save), config and preprocessor json."""
    torch.manual_seed(3)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14)
    model = CLIPVisionModel(config)
    model.save_pretrained(folder)  # config.json (+ safetensors, replaced below)
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    return model


def test_convert_a_torch_saved_clip_tower(tmp_path):
    source = tmp_path / "clip-bin"
    source.mkdir()
    original = _clip_checkpoint(source)
    torch.save({"not": "weights"}, source / "training_args.bin")  # trainer state is skipped, not converted
    assert convert_bin_to_safetensors.main([str(source), str(tmp_path / "clip")]) == 0
    assert sorted(os.listdir(tmp_path / "clip")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    converted = CLIPVisionModel.from_pretrained(str(tmp_path / "clip"))
    for name, tensor in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


def test_convert_shards_index_tied_weights_and_a_projector_file(tmp_path):
    source = tmp_path / "old"
    source.mkdir()
    embed = torch.randn(10, 4)
    torch.save({"embed.weight": embed, "lm_head.weight": embed, "a": torch.randn(3)[1:]},
               source / "pytorch_model-00001-of-00002.bin")
    torch.save({"state_dict": {"b": torch.ones(2)}, "epoch": 3}, source / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {"total_size": 1}, "weight_map": {"embed.weight": "pytorch_model-00001-of-00002.bin",
                                                           "lm_head.weight": "pytorch_model-00001-of-00002.bin",
                                                           "a": "pytorch_model-00001-of-00002.bin",
                                                           "b": "pytorch_model-00002-of-00002.bin"}}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    torch.save({"model.multi_modal_projector.linear_1.weight": torch.randn(4, 2)}, source / "mm_projector.bin")
    out = tmp_path / "new"
    assert convert_bin_to_safetensors.main([str(source), str(out)]) == 0
    first = load_file(str(out / "model-00001-of-00002.safetensors"))
    assert torch.equal(first["embed.weight"], embed) and torch.equal(first["lm_head.weight"], embed)
    assert first["a"].shape == (2,)
    assert torch.equal(load_file(str(out / "model-00002-of-00002.safetensors"))["b"], torch.ones(2))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map["b"] == "model-00002-of-00002.safetensors"
    assert set(weight_map.values()) <= set(os.listdir(out))
    assert "pytorch_model.bin.index.json" not in os.listdir(out)
    assert list(load_file(str(out / "mm_projector.safetensors"))) == ["model.multi_modal_projector.linear_1.weight"]


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): what a malicious checkpoint does, harmlessly."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_convert_refuses_a_pickle_that_runs_code(tmp_path, writer, capsys):
    control = tmp_path / "created-by-unsafe-load"
    pickle.loads(pickle.dumps(_CreatesAFile(str(control)), protocol=2))
    assert control.exists()  # the payload is real: an unsafe load creates the file

    target = tmp_path / "pwned"
    source = tmp_path / "evil"
    source.mkdir()
    payload = {"weight": torch.zeros(2), "x": _CreatesAFile(str(target))}
    if writer == "torch.save":
        torch.save(payload, source / "pytorch_model.bin")
    else:
        with open(source / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f, protocol=2)
    (source / "config.json").write_text("{}")
    out = tmp_path / "out"
    assert convert_bin_to_safetensors.main([str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "CVE-2025-32434" in err
    assert not target.exists()
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".converting-")]


def test_merge_tolerance_scales_with_the_logits():
    # float32 rounding is relative: the allowed difference grows with the largest logit, and stays absolute below 1.
    assert export_tools.scaled_tolerance(1e-4, torch.tensor([[0.3, -0.5]])) == pytest.approx(1e-4)
    assert export_tools.scaled_tolerance(1e-4, torch.tensor([[12.0, -40.0]])) == pytest.approx(4e-3)
