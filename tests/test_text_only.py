"""Text-only fine-tuning (a causal LM and no --vision_tower) and where LoRA adapters go. The "what users
have" models (a Llama-3-style base, Phi-3- and GPT-2-shaped models) are written with stock transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, Phi3Config,
                          Phi3ForCausalLM)

from dpo_data import write_preference_dataset
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.model.lora import apply_lora, lora_target_names
from llava_tiny.train import train as train_module
from llava_tiny.train.arguments import parse_args
from llava_tiny.train.train_dpo import DPOTrainingArguments, train_dpo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_style_base(tmp_path_factory, tiny_parts):
    """A small causal LM whose tokenizer carries Llama-3's chat tokens, as Llama-3.2-Instruct's does."""
    folder = str(tmp_path_factory.mktemp("llama3") / "base")
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts["llm"])
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_3_TOKENS})
    model = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _messages_jsonl(path, n, first=0):
    with open(path, "w") as f:
        for i in range(first, first + n):
            f.write(json.dumps({"id": f"m{i}", "messages": [
                {"role": "system", "content": "Answer with the number only."},
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": str(i + 1)}]}) + "\n")
    return str(path)


def _argv(base, tmp_path, out, *flags):
    return ["--model_name_or_path", base, "--data_path", _messages_jsonl(tmp_path / "train.jsonl", 16),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0", *map(str, flags)]


def test_text_only_qlora_with_llama_3_trains_evaluates_and_loads_in_stock_peft(tmp_path, llama3_style_base):
    out = tmp_path / "out"
    train_module.train(argv=_argv(
        llama3_style_base, tmp_path, out, "--version", "llama_3", "--lora_enable", "True", "--bits", "4",
        "--lora_r", "8", "--lora_alpha", "16", "--optim", "paged_adamw_8bit", "--learning_rate", "1e-2",
        "--max_steps", "6", "--eval_data_path", _messages_jsonl(tmp_path / "eval.jsonl", 4, first=50),
        "--eval_strategy", "steps", "--eval_steps", "3"))
    history = json.load(open(out / "trainer_state.json"))["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert [e["step"] for e in history if "eval_loss" in e] == [3, 6]
    assert losses[-1] < losses[0]
    assert not (out / "model.safetensors").exists()  # adapters only
    assert (out / "adapter_model.safetensors").is_file()

    from peft import PeftModel

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama3_style_base), str(out)).eval()
    ours = load_pretrained_model(str(out), device="cpu")
    assert ours.kind == "lora" and ours.template == "llama_3"
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ours.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def text_lora(tmp_path_factory, llama3_style_base):
    """A text-only LoRA folder of ours, trained with --model_max_length well below the model's 2048 positions."""
    root = tmp_path_factory.mktemp("text-lora")
    out = root / "sft"
    train_module.train(argv=_argv(llama3_style_base, root, out, "--version", "llama_3", "--lora_enable", "True",
                                  "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--max_steps", "2",
                                  "--model_max_length", "128"))
    return str(out)


PROBE = [[1, 5, 9, 42, 7]]
STOCK_ONE_LINER = ("import json, sys, torch; from transformers import AutoModelForCausalLM; "
                   "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
                   f"print(json.dumps(model(input_ids=torch.tensor({PROBE})).logits[0, -1].tolist()))")


def test_a_text_lora_folder_loads_with_the_stock_one_liner(text_lora, llama3_style_base):
    """Peer: `AutoModelForCausalLM.from_pretrained(folder)` (transformers' PEFT integration) in a subprocess that
    imports nothing of ours gives our loader's logits, with the adapter applied."""
    stock = subprocess.run([sys.executable, "-c", STOCK_ONE_LINER, text_lora], capture_output=True, text=True,
                           timeout=300, cwd=os.path.dirname(text_lora), env=dict(os.environ, PYTHONPATH=""))
    assert stock.returncode == 0, stock.stderr[-3000:]
    stock_logits = torch.tensor(json.loads(stock.stdout.strip().splitlines()[-1]))
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        ours = load_pretrained_model(text_lora, device="cpu").model(input_ids=ids).logits[0, -1]
        base = AutoModelForCausalLM.from_pretrained(llama3_style_base)(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(stock_logits, ours, atol=1e-4, rtol=1e-4)
    assert (stock_logits - base).abs().max() > 1e-3  # the adapter is there, not the base alone


def test_the_saved_tokenizer_keeps_the_models_context_length(text_lora):
    """--model_max_length truncates training samples; it is not written as the model's limit, which the server
    serves (peer: stock AutoTokenizer reading the folder)."""
    from llava_tiny.serve.chat_request import context_length

    assert AutoTokenizer.from_pretrained(text_lora).model_max_length == 2048  # the base's, not training's 128
    assert context_length(load_pretrained_model(text_lora, device="cpu")) == 2048


def test_dpo_starts_from_a_text_lora_folder_with_no_projector_flags(tmp_path, text_lora, llama3_style_base, caplog):
    """docs/training.md's recipe (Starting points), SFT then DPO, on a text-only LoRA folder: no
    --freeze_mm_mlp_adapter asked for, --mm_projector_lr named as without effect; the result is SFT merged + the
    DPO adapter (peer: stock peft)."""
    from peft import PeftModel

    pairs = write_preference_dataset(tmp_path, n=0, text_only=8)
    out = tmp_path / "dpo"
    with caplog.at_level("WARNING"):
        train_dpo(argv=["--model_name_or_path", text_lora, "--data_path", pairs, "--output_dir", str(out),
                        "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--mm_projector_lr", "1e-3",
                        "--learning_rate", "1e-2", "--max_steps", "2", "--per_device_train_batch_size", "4",
                        "--save_strategy", "no", "--report_to", "none", "--seed", "0"])
    assert any("text-only run" in r.getMessage() and "--mm_projector_lr" in r.getMessage() for r in caplog.records)
    assert not (out / "config.json").exists()  # a stock PEFT folder
    assert json.load(open(out / "adapter_config.json"))["base_model_name_or_path"] == text_lora
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama3_style_base), text_lora)
    stock = PeftModel.from_pretrained(sft.merge_and_unload(), str(out)).eval()
    ours = load_pretrained_model(str(out), device="cpu")
    assert ours.template == "llama_3"
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, ours.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def _launched_flags(tmp_path, script: str, **env) -> list[str]:
    """The training flags `scripts/<script>` hands its launcher: a stub `deepspeed` first on PATH records them
    (without --deepspeed: they are parsed here, in one process), and a stub `python` answers launch.sh's GPU check
    (no GPU) without importing torch."""
    stub = tmp_path / "bin" / "deepspeed"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$LAUNCHED"\n')
    (tmp_path / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("deepspeed", "python"):
        (tmp_path / "bin" / tool).chmod(0o755)
    launched = tmp_path / f"{script}.argv"
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", script)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env, LAUNCHED=str(launched), MASTER_PORT="29999",
                                   PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}"))
    assert done.returncode == 0, done.stderr[-3000:]
    argv = launched.read_text().splitlines()
    flags = argv[next(i for i, a in enumerate(argv) if a.endswith(".py")) + 1:]
    at = flags.index("--deepspeed")
    return flags[:at] + flags[at + 2:]


def test_the_scripts_run_text_only_with_an_empty_vision_tower(tmp_path, tiny_parts, text_lora, caplog):
    """VISION_TOWER="" in finetune_*.sh and dpo.sh: no tower, projector or image folder reaches the flags (peer:
    bash running the scripts themselves), and the projector's flags are named as without effect."""
    data = _messages_jsonl(tmp_path / "train.jsonl", 4)
    for script in ("finetune_full.sh", "finetune_lora.sh", "finetune_qlora.sh"):
        flags = _launched_flags(tmp_path, script, VISION_TOWER="", LLM=tiny_parts["llm"], DATA=data,
                                OUT=str(tmp_path / script))
        with caplog.at_level("WARNING", logger="llava_tiny.train.arguments"):
            args = parse_args(flags)
        assert (args.model.vision_tower, args.model.pretrain_mm_mlp_adapter, args.data.image_folder) == (None,) * 3
        assert "--mm_projector_type" in caplog.text and "no effect in a text-only run" in caplog.text
    pairs = write_preference_dataset(tmp_path, n=0, text_only=4)
    args = parse_args(_launched_flags(tmp_path, "dpo.sh", VISION_TOWER="", MODEL=text_lora, DATA=pairs,
                                      OUT=str(tmp_path / "dpo")), DPOTrainingArguments)
    assert args.model.model_name_or_path == text_lora and args.data.image_folder is None


def test_text_only_full_finetuning_learns_and_refuses_image_records(tmp_path, tiny_parts, color_data):
    out = tmp_path / "full"
    train_module.train(argv=_argv(tiny_parts["llm"], tmp_path, out, "--max_steps", "6", "--learning_rate", "3e-3"))
    losses = [e["loss"] for e in json.load(open(out / "trainer_state.json"))["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    loaded = load_pretrained_model(str(out), device="cpu")
    assert loaded.kind == "text" and loaded.image_processor is None
    assert type(AutoModelForCausalLM.from_pretrained(str(out))).__name__ == "LlamaForCausalLM"  # a stock folder
    with pytest.raises(ValueError, match="has an image, but this run has no vision tower"):
        train_module.train(argv=["--model_name_or_path", tiny_parts["llm"], "--data_path", color_data["data_path"],
                                 "--image_folder", color_data["image_folder"], "--output_dir", str(tmp_path / "img"),
                                 "--max_steps", "1", "--report_to", "none"])


def test_lora_target_list_adapts_exactly_those_layers_of_the_language_model(tiny_parts):
    loaded = assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    layers = loaded.model.config.text_config.num_hidden_layers
    names = lora_target_names(loaded.model, "q_proj,v_proj")
    assert len(names) == 2 * layers and all(n.startswith("model.language_model.") for n in names)
    every = lora_target_names(loaded.model)
    assert len(every) == 7 * layers  # q k v o gate up down; never the tower, the projector or lm_head
    with pytest.raises(ValueError, match=r"matches no linear layer .* named \['down_proj', 'gate_proj'"):
        lora_target_names(loaded.model, "c_attn")
    peft_model = apply_lora(loaded.model, r=4, alpha=8, target_modules="q_proj,v_proj")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert len(adapted) == 2 * layers and all("vision_tower" not in n for n in adapted)


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_all_linear_finds_every_linear_layer_whatever_its_name(family):
    torch.manual_seed(0)
    if family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4, pad_token_id=0))
        expected = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
        expected = {"c_attn", "c_proj", "c_fc"}
    names = lora_target_names(model)
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    assert len(names) == 2 * (4 if family == "gpt2" else len(expected))  # GPT-2 has c_proj in attention and MLP
    peft_model = apply_lora(model, r=4, alpha=8)
    assert sum(".lora_A" in n for n, _ in peft_model.named_parameters()) == len(names)


def test_a_lora_target_list_matching_nothing_stops_the_run_before_training(tmp_path, tiny_parts, color_data):
    with pytest.raises(ValueError, match="--lora_target_modules qkv: matches no linear layer"):
        train_module.train(argv=["--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts["clip"],
                                 "--data_path", color_data["data_path"], "--image_folder", color_data["image_folder"],
                                 "--output_dir", str(tmp_path / "out"), "--lora_enable", "True",
                                 "--lora_target_modules", "qkv", "--max_steps", "1", "--report_to", "none"])


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_without_version_a_tokenizer_with_a_chat_template_uses_it_and_says_so(tmp_path, tiny_parts, caplog):
    folder = str(tmp_path / "chatml-llm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts["llm"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with caplog.at_level("INFO"):
        loaded = assemble_model(folder, tiny_parts["clip"])
    assert loaded.template == "auto"
    assert any("auto" in r.getMessage() and "template" in r.getMessage() for r in caplog.records)
    prompt = loaded.processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What color?"}]}], add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n<image>") and prompt.endswith("<|im_start|>assistant\n")
    assert assemble_model(tiny_parts["llm"], tiny_parts["clip"]).template == "llava_v1"  # no chat template


def test_a_text_only_model_is_served_and_refuses_images(tiny_parts):
    import base64
    import io

    from PIL import Image

    from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch
    from llava_tiny.serve.chat_request import ApiError, ChatRequest, prepare
    from llava_tiny.serve.engine import Engine, Sampling
    from llava_tiny.serve.served import ServedModel

    loaded = load_pretrained_model(tiny_parts["llm"], device="cpu")
    assert loaded.kind == "text"
    served = ServedModel.resolve(loaded)
    prompt, sampling = prepare(served, ChatRequest(model="m", messages=[{"role": "user", "content": "Hi there?"}],
                                                   max_tokens=6, temperature=0))
    assert prompt.input_ids == build_prompt(loaded, "Hi there?").input_ids
    engine = Engine(served)
    try:
        answer = engine.complete(prompt, Sampling(max_tokens=6)).text
    finally:
        engine.close()
    assert answer == generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=6))[0]
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with pytest.raises(ApiError, match="no vision tower") as err:
        prepare(served, ChatRequest(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}]))
    assert err.value.status == 400
