"""What the benchmarks run on: a synthetic LLaVA-665k-like data mix and random models of fixed shapes.

The mix imitates the length profile of LLaVA-1.5's `llava_v1_5_mix665k.json`, which is what makes
padding expensive: many short multi-turn VQA samples (VQAv2, GQA, OCR-VQA: one-word answers),
short captions (TextCaps), long instruction-following answers (LLaVA-Instruct), and text-only
ShareGPT conversations, the longest and most variable of all.

Shapes (all weights random; only the arithmetic matters for throughput):

    tiny  hidden 64, 2 layers, 16 image tokens            the smoke test
    cpu   hidden 256, 4 layers, 144 image tokens          text lengths x0.25 (the 2-core CPU runs)
    gpu   TinyLlama-1.1B + CLIP ViT-L/14-336, 576 image tokens, real lengths (--gpu-shapes)
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass

from PIL import Image

# _WORDS: the vocabulary the small test tokenizer is trained on, so a word is about one token.
from llava_tiny.testing.tiny import _WORDS, LLAMA2_TOKENIZER, make_tiny_llm, make_tiny_vision_tower


@dataclass(frozen=True)
class Shapes:
    name: str
    hidden: int
    layers: int
    heads: int
    vision_hidden: int
    vision_layers: int
    image_size: int
    patch_size: int
    length_scale: float  # multiplies every word count of the mix (1.0 = LLaVA-665k lengths)
    model_max_length: int
    tokenizer: str = "small"


SHAPES = {
    "tiny": Shapes("tiny", hidden=64, layers=2, heads=4, vision_hidden=32, vision_layers=2, image_size=56,
                   patch_size=14, length_scale=0.1, model_max_length=256),
    "cpu": Shapes("cpu", hidden=256, layers=4, heads=4, vision_hidden=128, vision_layers=2, image_size=168,
                  patch_size=14, length_scale=0.25, model_max_length=512),
    "gpu": Shapes("gpu", hidden=2048, layers=22, heads=32, vision_hidden=1024, vision_layers=24, image_size=336,
                  patch_size=14, length_scale=1.0, model_max_length=2048, tokenizer="llama2"),
}


@dataclass(frozen=True)
class SampleKind:
    """One source of the mix: its share, turns per sample, words per question and per answer."""

    name: str
    share: float
    image: bool
    turns: tuple[int, int]
    question_words: tuple[int, int]
    answer_words: tuple[int, int]
    question_suffix: str = ""


# Shares and lengths after LLaVA-1.5's mix: VQA-style sources hold several short turns per image
# (the "single word or phrase" prompt), LLaVA-Instruct long answers, ShareGPT long text-only
# chats. Text-only is 12% here (6% in the 665k mix; fine-tuning sets often hold more).
MIX = (
    SampleKind("vqa", 0.45, True, (1, 8), (5, 12), (1, 3), " Answer the question using a single word or phrase."),
    SampleKind("caption", 0.08, True, (1, 1), (6, 10), (8, 24)),
    SampleKind("instruct", 0.35, True, (1, 4), (8, 24), (40, 220)),
    SampleKind("text", 0.12, False, (1, 6), (10, 40), (40, 300)),
)


def _words(rng: random.Random, bounds: tuple[int, int], scale: float) -> str:
    low, high = (max(1, round(b * scale)) for b in bounds)
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def _image(rng: random.Random) -> Image.Image:
    """A photo-sized image (aspect ratios vary, so `pad` preprocessing does real work)."""
    width, height = rng.randint(240, 640), rng.randint(240, 640)
    base = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (base, base.rotate(rng.randint(0, 359)), base.transpose(Image.FLIP_LEFT_RIGHT)))


def write_mix(out_dir: str, num_samples: int, length_scale: float = 1.0, seed: int = 0,
              num_images: int = 32) -> str:
    """Write `num_samples` LLaVA-format samples drawn from `MIX` (+ JPEG images) under `out_dir`.

    Images are reused across samples (`num_images` files): decoding and preprocessing still happen
    per sample, as in training. Returns the JSON path; `image_folder` is `out_dir`.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for i in range(num_images):
        _image(rng).save(os.path.join(out_dir, "images", f"{i}.jpg"), quality=90)
    kinds = rng.choices(MIX, weights=[k.share for k in MIX], k=num_samples)
    samples = []
    for n, kind in enumerate(kinds):
        conversations = []
        for turn in range(rng.randint(*kind.turns)):
            question = _words(rng, kind.question_words, length_scale).capitalize() + "?" + kind.question_suffix
            if kind.image and turn == 0:
                question = "<image>\n" + question
            conversations += [{"from": "human", "value": question},
                              {"from": "gpt", "value": _words(rng, kind.answer_words, length_scale) + "."}]
        sample = {"id": f"{kind.name}-{n}", "conversations": conversations}
        if kind.image:
            sample["image"] = f"images/{rng.randrange(num_images)}.jpg"
        samples.append(sample)
    path = os.path.join(out_dir, "mix.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def _write_gpu_shapes(out_dir: str) -> dict[str, str]:
    """TinyLlama-1.1B and CLIP ViT-L/14-336 architectures with random weights (no download)."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    llm_dir, clip_dir = os.path.join(out_dir, "llm"), os.path.join(out_dir, "clip")
    os.makedirs(llm_dir, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(os.path.join(LLAMA2_TOKENIZER, name), llm_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)).save_pretrained(llm_dir)
    CLIPVisionModel(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu")).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(clip_dir)
    return {"llm": llm_dir, "clip": clip_dir}


def write_models(out_dir: str, shapes: Shapes, seed: int = 42) -> dict[str, str]:
    """Write the LLM and the vision tower of `shapes`; then one assembled LLaVA both sides load.

    Returns paths: `llm`, `clip` (the parts train.py assembles) and `llava` (the same model saved
    once, stock-loadable, so the baseline's `LlavaForConditionalGeneration` gets identical weights).
    The projector is initialised after `set_seed(seed)`, as train.py does with its `--seed`.
    """
    import torch
    from transformers import set_seed

    from llava_tiny.model.builder import assemble_model

    if shapes.name == "gpu":
        parts = _write_gpu_shapes(out_dir)
    else:
        parts = {
            "llm": make_tiny_llm(os.path.join(out_dir, "llm"), shapes.tokenizer, shapes.hidden, shapes.layers,
                                 shapes.heads),
            "clip": make_tiny_vision_tower(os.path.join(out_dir, "clip"), "clip", shapes.image_size,
                                           shapes.patch_size, shapes.vision_hidden, shapes.vision_layers),
        }
    set_seed(seed)
    loaded = assemble_model(parts["llm"], parts["clip"], dtype=torch.float32)
    parts["llava"] = os.path.join(out_dir, "llava")
    loaded.save_pretrained(parts["llava"])
    return parts
