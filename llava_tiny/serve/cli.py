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
from ..images import ASPECT_RATIOS, IMAGE_BACKGROUNDS, load_image
from ..inference import GenerationSettings, build_prompt, generate_batch

EXIT_WORDS = ("exit", "quit")


class ChatSession:
    """A conversation about one image (or none): `ask` answers and remembers the turn."""

    def __init__(self, loaded, image=None, settings: GenerationSettings | None = None, conv_mode: str | None = None):
        self.loaded = loaded
        self.images = [image] if image is not None else []
        self.settings = settings or GenerationSettings()
        self.conv_mode = conv_mode
        self.history: list[tuple[str, str]] = []

    def ask(self, text: str) -> str:
        """Answer `text` given the earlier turns; the image marker goes before the first question."""
        # Markers are ours to place: one typed by the user would ask for an image that is not there.
        question = text.replace(IMAGE_TOKEN, "").strip()
        if not self.history and self.images:
            question = f"{IMAGE_TOKEN}\n{question}"
        prompt = build_prompt(self.loaded, question, self.images, self.history, self.conv_mode)
        answer = generate_batch(self.loaded, [prompt], self.settings, self.conv_mode)[0]
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
    parser.add_argument("--num-beams", "--num_beams", type=int, default=1)
    parser.add_argument("--image-aspect-ratio", "--image_aspect_ratio", choices=ASPECT_RATIOS, default="pad")
    parser.add_argument("--image-background", "--image_background", choices=IMAGE_BACKGROUNDS, default="white",
                        help="what transparent pixels become: white, or the processor's mean colour (default white)")
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling seed")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    return parser.parse_args(argv)


def main(argv=None, stdin=None, stdout=None) -> int:
    """Run the chat; `stdin`/`stdout` default to the process's (tests pass their own streams)."""
    import torch

    from ..model.builder import load_pretrained_model

    args = parse_args(argv)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    image = load_image(args.image_file) if args.image_file else None
    if args.seed is not None:
        torch.manual_seed(args.seed)
    loaded = load_pretrained_model(args.model_path, model_base=args.model_base, device=args.device)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, num_beams=args.num_beams,
                                  image_aspect_ratio=args.image_aspect_ratio, image_background=args.image_background)
    chat = ChatSession(loaded, image, settings, args.conv_mode)
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
        print(f"ASSISTANT: {chat.ask(text)}", file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
