"""What `bench.real_shapes` runs on: the parts (random weights from the published configs, written with
stock transformers, as users have them from the hub), the data, and the phases that are not a script of
ours (reload, one API request), each run as its own process so that its memory is its own:

    python -m bench.real_shapes_parts reload RUN_DIR
    python -m bench.real_shapes_parts serve EXPORT_DIR IMAGE
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import sys

from llava_tiny.testing.tiny import LLAMA2_TOKENIZER

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 and openai/clip-vit-large-patch14-336, their config.json values.
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, hidden_act="silu")
CLIP_L_336 = dict(
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    projection_dim=768)
# 576 image tokens + a question and an answer: LLaVA's 2048 would only add padding-free length here.
REAL = dict(name="real: TinyLlama-1.1B + CLIP ViT-L/14-336, mlp2x_gelu, 576 image tokens", llm=TINYLLAMA,
            clip=CLIP_L_336, model_max_length=768, llm_dtype="bfloat16")
# The same phases at tiny shapes (the exact tokenizer, so the same 32000-row vocabulary): 16 image tokens.
DRY = dict(name="dry run: tiny random shapes, same phases", model_max_length=256, llm_dtype="bfloat16",
           llm=dict(TINYLLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
           clip=dict(vision=dict(CLIP_L_336["vision"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=56, projection_dim=32),
                     text=dict(CLIP_L_336["text"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, projection_dim=32),
                     projection_dim=32))

QUESTIONS = [("What colour is the picture?", "The picture is {c}."), ("Describe the image.", "A plain {c} square.")]
COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 200), "yellow": (230, 210, 40)}


def write_parts(out: str, shapes: dict) -> dict[str, str]:
    """`llm/` (Llama, the exact TinyLlama tokenizer) and `clip/` (a full CLIP model, as the hub's
    openai/clip-vit-large-patch14-336 is, with its image processor); kept when already written."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM

    paths = {"llm": os.path.join(out, "llm"), "clip": os.path.join(out, "clip")}
    done = os.path.join(out, "parts.json")
    if os.path.isfile(done) and json.load(open(done)) == {"llm": shapes["llm"], "clip": shapes["clip"]}:
        return paths
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(**shapes["llm"]))
    llm.to(getattr(torch, shapes["llm_dtype"])).save_pretrained(paths["llm"])  # the hub's TinyLlama is bf16
    del llm
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(os.path.join(LLAMA2_TOKENIZER, name), paths["llm"])
    clip = shapes["clip"]
    CLIPModel(CLIPConfig(vision_config=clip["vision"], text_config=clip["text"],
                         projection_dim=clip["projection_dim"])).save_pretrained(paths["clip"])
    size = clip["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        paths["clip"])
    with open(done, "w") as f:
        json.dump({"llm": shapes["llm"], "clip": shapes["clip"]}, f)
    return paths


def write_data(out: str, shapes: dict, records: int = 8) -> dict[str, str]:
    """LLaVA-format records with one plain-colour image each (full-size images: the processor's real work)."""
    from PIL import Image

    folder = os.path.join(out, "images")
    os.makedirs(folder, exist_ok=True)
    size = shapes["clip"]["vision"]["image_size"]
    rows = []
    for i in range(records):
        colour = list(COLOURS)[i % len(COLOURS)]
        name = f"{colour}.png"
        Image.new("RGB", (size + 40, size), COLOURS[colour]).save(os.path.join(folder, name))
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        rows.append({"id": f"s{i}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer.format(c=colour)}]})
    path = os.path.join(out, "data.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return {"data_path": path, "image_folder": folder, "image": os.path.join(folder, "red.png")}


def bitsandbytes_4bit_on_cpu() -> bool:
    """Whether a 4-bit bitsandbytes layer runs forward and backward here (in a child: a native crash stays there)."""
    import subprocess

    code = ("import torch, bitsandbytes as bnb; layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, "
            "quant_type='nf4').to('cpu'); x = torch.randn(2, 64, requires_grad=True); layer(x).sum().backward(); "
            "assert layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8 and x.grad is not None")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0


def stock_load_command(export: str) -> list[str]:
    """Load the export with stock transformers only and run one image prompt; fails if our package was imported."""
    code = f"""
import sys, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
d = {export!r}
model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(d)
size = model.config.vision_config.image_size
prompt = processor.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}},
    {{"type": "text", "text": "What colour is the picture?"}}]}}], add_generation_prompt=True)
inputs = processor(images=Image.new("RGB", (size, size), (200, 30, 30)), text=prompt, return_tensors="pt")
tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
assert tokens == model.config.image_seq_length, (tokens, model.config.image_seq_length)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
assert not [m for m in sys.modules if m.startswith("llava_tiny")], "imported llava_tiny"
print("stock transformers:", type(model).__name__, tokens, "image tokens;", out.shape[1] - inputs["input_ids"].shape[1],
      "new tokens")
"""
    return [sys.executable, "-c", code]


def reload(run_dir: str) -> None:
    """Load a saved run back for inference with this project's loader (as evaluation and serving do)."""
    from llava_tiny.model.builder import load_pretrained_model
    from llava_tiny.model.assembly import count_parameters

    loaded = load_pretrained_model(run_dir, device="cpu", merge_lora=False)
    print(f"reloaded {run_dir}: a {loaded.kind} checkpoint, {count_parameters(loaded.model)} parameters")


def serve(export: str, image: str) -> None:
    """Start the OpenAI-compatible server on the export and answer one chat request with an image."""
    import urllib.request

    from llava_tiny.serve.launch import ServerProcess

    url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
    body = {"model": os.path.basename(export.rstrip("/")), "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is the picture?"}]}]}
    log = os.path.join(os.path.dirname(export.rstrip("/")), "serve.log")
    with ServerProcess("llava_tiny.serve.api", ["--model-path", export, "--insecure-no-api-key", "--device", "cpu",
                                                "--log-level", "warning"], log, timeout=900) as server:
        request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=900) as response:
            answer = json.load(response)
    assert answer["choices"][0]["message"]["role"] == "assistant", answer
    print("API answer:", json.dumps(answer["choices"][0]["message"]), answer.get("usage"))


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"reload": reload, "serve": serve}[command](*rest)
