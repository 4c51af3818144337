"""Tiny random models written to local folders, so tests and the demo go through the real
`from_pretrained(path)` code with no model hub.

    python -m llava_tiny.testing.tiny --out runs/tiny [--tokenizer small|llama2] [--hidden 64] \
        [--tokenizer-from data/mine.json]

writes `llm/` (Llama-family causal LM + tokenizer), `clip/` and `siglip/` (vision model + image
processor) under `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections import Counter

import torch
from tokenizers import Tokenizer, models, trainers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel)

from ..conversation import IMAGE_TOKEN
from ..data import load_samples

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tests", "fixtures")
LLAMA2_TOKENIZER = os.path.join(FIXTURES, "llama2-tokenizer")

_WORDS = """a an the is are there what which how many color colour shape object objects image picture
red green blue yellow purple orange white black gray square circle triangle star left right top bottom
middle center centre of in on and or with without yes no one two three four five six seven eight nine
zero describe caption question answer user assistant system chat human helpful detailed polite answers
to questions curious artificial intelligence gives between you are this that it its small large big
photo scene shows contains remote sensing airport building road river field forest area near""".split()


def _byte_tokens() -> list[str]:
    return [f"<0x{i:02X}>" for i in range(256)]


def dataset_words(data_path: str) -> Counter:
    """How often each word (letters and digits, case kept) occurs in the turns of a LLaVA data file."""
    words: Counter = Counter()
    for sample in load_samples(data_path):
        for turn in sample.get("conversations") or []:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                words.update(re.findall(r"[^\W_]+", turn["value"].replace(IMAGE_TOKEN, " ")))
    return words


def make_small_tokenizer(out_dir: str, vocab_size: int = 1000, words: Counter | None = None) -> PreTrainedTokenizerFast:
    """A small Llama-style tokenizer (BPE with byte fallback, '▁' word marker), trained here.

    Same normalizer/decoder recipe as the Llama-2 fixture, so masks behave the same, but a
    vocabulary ~30x smaller keeps tiny models fast. `words` (e.g. `dataset_words(DATA.json)`) adds a
    dataset's own words, the most frequent first, so its answers are whole tokens, not letters.
    """
    reference = json.load(open(os.path.join(LLAMA2_TOKENIZER, "tokenizer.json")))
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-()<>|/\n"),
                                  show_progress=False)
    vocabulary = list(dict.fromkeys(_WORDS + [w for w, _ in (words or Counter()).most_common(vocab_size)]))
    corpus = [" ".join(vocabulary)] + [f"▁{w}" for w in vocabulary] * 20 + [" ".join(map(str, range(100)))]
    corpus = [line.replace(" ", "▁") for line in corpus]
    tok.train_from_iterator(corpus, trainer)
    data = json.loads(tok.to_str())
    # Byte-fallback pieces, then the Llama normalizer/decoder/post-processor recipe.
    vocab = data["model"]["vocab"]
    for piece in _byte_tokens():
        vocab.setdefault(piece, len(vocab))
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        data[key] = reference[key]
    data["post_processor"]["special_tokens"]["<s>"]["ids"] = [vocab["<s>"]]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                                        model_max_length=2048, padding_side="right")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_tiny_llm(out_dir: str, tokenizer: str = "small", hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, seed: int = 0, words: Counter | None = None) -> str:
    """A random Llama causal LM with a tokenizer ('small' trained here, with `words` too, or the exact 'llama2' one)."""
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer == "llama2":
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            shutil.copy(os.path.join(LLAMA2_TOKENIZER, name), out_dir)
        vocab = 32000
    else:
        vocab = len(make_small_tokenizer(out_dir, words=words))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def make_tiny_vision_tower(out_dir: str, family: str = "clip", image_size: int = 56, patch_size: int = 14,
                           hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """A random CLIP or SigLIP vision model with its image processor."""
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                  num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    if family == "clip":
        CLIPVisionModel(CLIPVisionConfig(projection_dim=hidden_size, **common)).save_pretrained(out_dir)
        CLIPImageProcessor(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    elif family == "siglip":
        SiglipVisionModel(SiglipVisionConfig(**common)).save_pretrained(out_dir)
        SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    else:
        raise ValueError(f"unknown vision family {family!r}; expected 'clip' or 'siglip'")
    return out_dir


def make_tiny_parts(out_dir: str, tokenizer: str = "small", hidden_size: int = 64, num_layers: int = 2,
                    image_size: int = 56, vision_hidden_size: int = 32, vision_layers: int = 2,
                    patch_size: int = 14, seed: int = 0, words: Counter | None = None) -> dict[str, str]:
    """Write `llm/`, `clip/` and `siglip/` under `out_dir`; return their paths."""
    return {
        "llm": make_tiny_llm(os.path.join(out_dir, "llm"), tokenizer, hidden_size, num_layers, seed=seed, words=words),
        "clip": make_tiny_vision_tower(os.path.join(out_dir, "clip"), "clip", image_size, patch_size,
                                       vision_hidden_size, vision_layers, seed),
        "siglip": make_tiny_vision_tower(os.path.join(out_dir, "siglip"), "siglip", image_size, patch_size,
                                         vision_hidden_size, vision_layers, seed),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", choices=["small", "llama2"], default="small")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--vision-hidden", type=int, default=32)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", metavar="DATA.json",
                        help="also learn the words of this LLaVA data file (small tokenizer): a from-scratch run on "
                             "your data then sees its words as whole tokens")
    args = parser.parse_args(argv)
    words = dataset_words(args.tokenizer_from) if args.tokenizer_from else None
    paths = make_tiny_parts(args.out, args.tokenizer, args.hidden, args.layers, args.image_size,
                            args.vision_hidden, args.vision_layers, args.patch_size, args.seed, words)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
