"""Chat with a model about an image in the terminal.

    python -m llava_tiny.serve.cli --model-path runs/lora --image-file photo.jpg
    python -m llava_tiny.serve.cli --model-path runs/lora --image-file photo.jpg --query "What is shown?"

Interactive mode reads one question per line until EOF or `exit`, keeping the conversation as
history; the first question carries the image. With `--query` it answers once and exits (only
the answer is printed, for scripts). Prompts are built exactly as in training and evaluation.
"""
from __future__ import annotations

import argparse
import sys

from ..conversation import IMAGE_TOKEN
from ..images import add_image_flags, load_image
from ..inference import build_prompt
from .engine import Engine, Sampling

EXIT_WORDS = ("exit", "quit")


class ChatSession:
    """A conversation about one image (or none) through the serving engine: `ask` streams the answer
    and remembers the turn."""

    def __init__(self, engine: Engine, image=None, sampling: Sampling | None = None):
        self.engine = engine
        self.images = [image] if image is not None else []
        self.sampling = sampling or Sampling()
        self.history: list[tuple[str, str]] = []

    def ask(self, text: str, on_delta=None) -> str:
        """Answer `text` given the earlier turns (`on_delta` gets each piece of text as it is generated);
        the image marker goes before the first question."""
        # Markers are ours to place: one typed by the user would ask for an image that is not there.
        question = text.replace(IMAGE_TOKEN, "").strip()
        if not self.history and self.images:
            question = f"{IMAGE_TOKEN}\n{question}"
        prompt = build_prompt(self.engine.loaded, question, self.images, self.history, self.engine.conv_mode)
        for event in self.engine.stream(prompt, self.sampling):
            if isinstance(event, str) and on_delta is not None:
                on_delta(event)
        answer = event.text.strip()
        self.history.append((question, answer))
        return answer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", "--model_path", required=True,
                        help="any checkpoint: full model, LoRA folder or stage-1 projector folder")
    parser.add_argument("--model-base", "--model_base", default=None)
    parser.add_argument("--image-file", "--image_file", default=None, help="the image to talk about (optional)")
    parser.add_argument("--query", default=None, help="answer this one question and exit")
    parser.add_argument("--conv-mode", "--conv_mode", default=None,
                        help="chat template (default: the one the checkpoint was trained with)")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--top-p", "--top_p", type=float, default=None)
    add_image_flags(parser)
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling seed")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    return parser.parse_args(argv)


def main(argv=None, stdin=None, stdout=None) -> int:
    """Run the chat; `stdin`/`stdout` default to the process's (tests pass their own streams)."""
    from ..model.builder import load_pretrained_model

    args = parse_args(argv)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    image = load_image(args.image_file) if args.image_file else None
    loaded = load_pretrained_model(args.model_path, model_base=args.model_base, device=args.device)
    engine = Engine(loaded, args.conv_mode, max_batch_size=1, image_aspect_ratio=args.image_aspect_ratio,
                    image_background=args.image_background)
    chat = ChatSession(engine, image, Sampling(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                               top_p=args.top_p, seed=args.seed))
    try:
        if args.query is not None:
            print(chat.ask(args.query), file=stdout, flush=True)
            return 0
        interactive = stdin.isatty()
        while True:
            if interactive:
                print("USER: ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line:  # EOF
                break
            text = line.strip()
            if not text:
                continue
            if text.lower() in EXIT_WORDS:
                break
            print("ASSISTANT: ", end="", file=stdout, flush=True)
            if interactive:  # the answer appears as it is generated
                chat.ask(text, on_delta=lambda piece: print(piece, end="", file=stdout, flush=True))
                print(file=stdout, flush=True)
            else:
                print(chat.ask(text), file=stdout, flush=True)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
