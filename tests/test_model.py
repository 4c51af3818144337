"""The model: no ghost, exact image-token counts, stock-loadable saves, every checkpoint kind loads."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPVisionConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from llava_tiny.conversation import IGNORE_INDEX, tokenize_conversation, tokenize_prompt
from llava_tiny.images import preprocess_images
from llava_tiny.model.builder import assemble_model, count_parameters, load_pretrained_model
from llava_tiny.model.checkpoint_kinds import PROJECTOR
from llava_tiny.model.checkpoints import resolve_kind, save_checkpoint
from llava_tiny.model.projector import build_projector
from llava_tiny.model.vision import num_image_tokens
from llava_tiny.testing.tiny import make_tiny_llm, make_tiny_vision_tower


def _inputs(loaded, image_size=(70, 56), question="<image>\nWhat color is it?"):
    image = Image.new("RGB", image_size, (200, 30, 30))
    ids = tokenize_prompt(question, loaded.tokenizer, loaded.template, loaded.model.config.image_seq_length)
    pixels = preprocess_images([image], loaded.image_processor, "pad")
    return torch.tensor([ids]), pixels


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_parameter_count_is_the_sum_of_the_parts(tiny_parts, tower):
    from transformers import AutoModelForCausalLM, AutoModel

    loaded = assemble_model(tiny_parts["llm"], tiny_parts[tower])
    llm = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"])
    llm.resize_token_embeddings(len(loaded.tokenizer), mean_resizing=False)
    vision = AutoModel.from_pretrained(tiny_parts[tower])
    projector = loaded.model.model.multi_modal_projector
    assert count_parameters(loaded.model) == count_parameters(llm) + count_parameters(vision) + count_parameters(projector)
    # The attached modules are the ones used: no second LLM hides in the wrapper.
    assert sum(1 for m in loaded.model.modules() if type(m).__name__ == "LlamaModel") == 1


_ASSEMBLY_RSS = textwrap.dedent("""
    import os, sys, threading, time, torch
    from llava_tiny.model.builder import assemble_model
    from transformers import LlavaForConditionalGeneration
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    peak, done = [0], []
    def watch():  # sample current RSS: ru_maxrss would only show the import peak
        while not done:
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    before = rss()
    threading.Thread(target=watch, daemon=True).start()
    loaded = assemble_model(sys.argv[1], sys.argv[2])
    if sys.argv[3] == "ghost":  # what LLaVA forks do: a full random LLaVA, then the pretrained LLM put in
        ghost = LlavaForConditionalGeneration(loaded.model.config)
        ghost.model.language_model = loaded.model.model.language_model
    time.sleep(0.05)
    done.append(1)
    print(peak[0] - before)
""")


def test_assembly_peak_memory_holds_one_llm(tmp_path, tiny_parts):
    """Peak RSS of assembly stays well below what a second (ghost) LLM costs."""
    llm = make_tiny_llm(str(tmp_path / "llm"), tokenizer="small", hidden_size=512, num_layers=6, num_heads=8)
    llm_bytes = os.path.getsize(os.path.join(llm, "model.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def peak_kib(mode):
        out = subprocess.run([sys.executable, "-c", _ASSEMBLY_RSS, llm, tiny_parts["clip"], mode],
                             capture_output=True, text=True, env=env, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    ours, ghost = peak_kib("ours"), peak_kib("ghost")
    print(f"assembly peak {ours / 1e6:.0f} MB, with a ghost {ghost / 1e6:.0f} MB, LLM {llm_bytes / 1e6:.0f} MB")
    assert ghost - ours > 0.6 * llm_bytes, (ours, ghost, llm_bytes)
    assert ours < 2.2 * llm_bytes, (ours, llm_bytes)


@pytest.mark.parametrize("config, strategy, expected", [
    (CLIPVisionConfig(image_size=224, patch_size=14), None, 256),
    (CLIPVisionConfig(image_size=336, patch_size=14), None, 576),
    (CLIPVisionConfig(image_size=336, patch_size=14), "full", 577),
    (SiglipVisionConfig(image_size=384, patch_size=14), None, 729),
    (SiglipVisionConfig(image_size=224, patch_size=16), None, 196),
])
def test_image_token_count_from_config(config, strategy, expected):
    assert num_image_tokens(config, strategy) == expected


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_forward_backward_generate_fp32(tiny_parts, tower):
    loaded = assemble_model(tiny_parts["llm"], tiny_parts[tower])
    model, tok = loaded.model, loaded.tokenizer
    n = model.config.image_seq_length
    assert n == 16  # 56/14 squared; CLIP drops CLS, SigLIP has none
    conv = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]
    sample = tokenize_conversation(conv, tok, loaded.template, num_image_tokens=n, num_images=1)
    pixels = preprocess_images([Image.new("RGB", (56, 80), (255, 0, 0))], loaded.image_processor, "pad")
    out = model(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels]), pixel_values=pixels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([tokenize_prompt("<image>\nWhat color is it?", tok, loaded.template, n)])
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)


def test_requested_attention_reaches_the_language_model(tiny_parts):
    # The LLaVA shell resets its sub-configs to the default (sdpa); the request must survive assembly.
    model = assemble_model(tiny_parts["llm"], tiny_parts["clip"], attn_implementation="eager").model
    assert model.model.language_model.config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"


def test_stock_transformers_loads_mlp2x_gelu_with_same_logits(tmp_path, tiny_parts):
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    loaded.save_pretrained(str(tmp_path / "m"))
    config = json.load(open(tmp_path / "m" / "config.json"))
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(tmp_path / "m"))

    stock = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "m")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "m"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    stock_inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                             return_tensors="pt")
    ours = load_pretrained_model(str(tmp_path / "m"))
    ids, pixels = _inputs(ours, image_size=(56, 56))
    assert stock_inputs["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        expected = stock(**stock_inputs).logits
        got = ours.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projector_type", ["linear", "mlp3x_gelu", "identity"])
def test_other_projectors_load_through_registered_model_type(tmp_path, tiny_parts, projector_type):
    from transformers import AutoModelForImageTextToText

    tower = tiny_parts["clip"]
    if projector_type == "identity":  # needs the tower's width == the LLM's
        tower = make_tiny_vision_tower(str(tmp_path / "clip64"), "clip", hidden_size=64)
    loaded = assemble_model(tiny_parts["llm"], tower, mm_projector_type=projector_type)
    loaded.save_pretrained(str(tmp_path / "m"))
    assert json.load(open(tmp_path / "m" / "config.json"))["model_type"] == "llava_tiny"
    reloaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "m")).eval()
    ids, pixels = _inputs(loaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pixels).logits,
                                   loaded.model.eval()(input_ids=ids, pixel_values=pixels).logits)


def test_importing_the_model_package_exports_and_registers_the_model(tmp_path, tiny_parts):
    """In a fresh process: `import llava_tiny.model` alone is what a user of a `linear` folder needs."""
    assemble_model(tiny_parts["llm"], tiny_parts["clip"], mm_projector_type="linear").save_pretrained(str(tmp_path / "m"))
    code = textwrap.dedent("""
        import sys
        from transformers import AutoModelForImageTextToText
        from llava_tiny.model import LlavaTinyConfig, LlavaTinyForCausalLM
        model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
        assert type(model) is LlavaTinyForCausalLM and isinstance(model.config, LlavaTinyConfig)
        print(model.config.mm_projector_type)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], cwd=root, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=root))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "linear"


def test_projector_builder_rejects_unknown_types():
    assert build_projector("mlp1x_gelu", 8, 16)(torch.zeros(1, 8)).shape == (1, 16)
    with pytest.raises(ValueError, match="unknown mm_projector_type 'mlp2x_relu'"):
        build_projector("mlp2x_relu", 8, 16)
    with pytest.raises(ValueError, match="needs equal hidden sizes"):
        build_projector("identity", 8, 16)


def test_load_pretrained_model_finds_the_kind_from_files(tmp_path, tiny_parts):
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    with torch.no_grad():
        loaded.model.model.multi_modal_projector.linear_2.bias.fill_(0.5)
    # A stage-1 folder named like a full model: the name is never used.
    stage1 = tmp_path / "llava-full-model-lora"
    save_checkpoint(PROJECTOR, loaded.model, loaded.processor, str(stage1))
    assert resolve_kind(str(stage1)) == "projector"
    reloaded = load_pretrained_model(str(stage1))
    assert reloaded.kind == "projector"
    assert torch.all(reloaded.model.model.multi_modal_projector.linear_2.bias == 0.5)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no model: expected model.safetensors"):
        load_pretrained_model(str(empty))


def test_labels_mask_image_and_prompt(tiny_parts):
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    sample = tokenize_conversation(conv, loaded.tokenizer, "llava_v1", num_image_tokens=16, num_images=1)
    image_id = loaded.model.config.image_token_index
    positions = [i for i, t in enumerate(sample.input_ids) if t == image_id]
    assert len(positions) == 16 and positions == list(range(positions[0], positions[0] + 16))
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)


def test_parameter_count_reads_zero3_partitioned_sizes():
    """Under ZeRO-3 a rank holds an empty tensor per partitioned parameter, its full size in `ds_numel`
    (DeepSpeed's attribute): the assembly log must not count 0 for it."""
    layer = torch.nn.Linear(4, 3)
    full = count_parameters(layer)
    layer.weight.data = torch.empty(0)
    layer.weight.ds_numel = 12  # as DeepSpeed's partitioning leaves it on a rank
    assert count_parameters(layer) == full == 15
