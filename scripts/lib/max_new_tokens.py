"""Print the demo's default --max-new-tokens: room for the longest answer of a training split.

    python scripts/lib/max_new_tokens.py --model-path runs/demo/model --data runs/demo/data/sets/data_train.json

The answers are tokenized with the trained model's own tokenizer (`llava_tiny.decoding.answer_room`:
the longest answer's tokens, the stop token and a margin). A fixed 24 cut 12 of 157 captions of a user's
set short, two of them inside a character.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from transformers import AutoTokenizer  # noqa: E402

from data_tools.io import DataToolError, load_samples  # noqa: E402
from llava_tiny.decoding import answer_room, longest_answer_tokens  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="a folder with the model's tokenizer")
    parser.add_argument("--data", required=True, help="the training split (LLaVA JSON or JSONL)")
    parser.add_argument("--margin", type=int, default=4, help="tokens beyond the longest answer and its stop (4)")
    args = parser.parse_args(argv)
    try:
        samples = load_samples(args.data)
    except DataToolError as error:
        print(f"max_new_tokens.py: {error}", file=sys.stderr)
        return 2
    longest = longest_answer_tokens(AutoTokenizer.from_pretrained(args.model_path), samples)
    if not longest:
        print(f"max_new_tokens.py: {args.data}: no assistant answer in {len(samples)} samples", file=sys.stderr)
        return 2
    print(answer_room(longest, args.margin))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
