"""Chat with a model about an image (or several) in the terminal.

    python -m llava_tiny.serve.cli --model-path runs/lora --image-file photo.jpg
    python -m llava_tiny.serve.cli --model-path runs/lora --image-file photo.jpg --query "What is shown?"
    python -m llava_tiny.serve.cli --model-path runs/lora --image-file a.png b.png --query "Same colour?"

Interactive mode reads one question per line until EOF or `exit`, keeping the conversation as
history; the first question carries the images (one `<image>` marker each, in order). With `--query` it answers once and exits (only
the answer is printed, for scripts). Each question goes through the API's own request checks and
limits (`chat_request.prepare`), so prompts are built exactly as in training, evaluation and the API.
"""
from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from ..images import add_image_flags
from .chat_request import ApiError, ChatRequest, data_url, prepare
from .engine import Engine
from .served import Limits, ServedModel

EXIT_WORDS = ("exit", "quit")


class ChatSession:
    """A conversation about some images (or none) through the serving engine, kept as OpenAI messages and
    answered through the API's own request checks (`chat_request.prepare`) and the model's limits: `ask`
    streams the answer and remembers the turn."""

    def __init__(self, engine: Engine, image_urls: list[str] = (), temperature: float = 0.0,
                 top_p: float | None = None, seed: int | None = None, max_tokens: int | None = None):
        self.engine, self.image_urls = engine, list(image_urls)
        self.decoding = dict(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens)
        self.messages: list[dict] = []

    def ask(self, text: str, on_delta=None) -> str:
        """Answer `text` given the earlier turns (`on_delta` gets each piece of text as it is generated); the
        images go with the first question. Raises `ApiError` (or pydantic's `ValidationError`) for what the
        API would refuse."""
        content = [{"type": "text", "text": text}]
        if not self.messages:
            content[:0] = [{"type": "image_url", "image_url": {"url": url}} for url in self.image_urls]
        messages = [*self.messages, {"role": "user", "content": content}]
        prompt, sampling = prepare(self.engine.model, ChatRequest(model="local", messages=messages, **self.decoding))
        for event in self.engine.stream(prompt, sampling):
            if isinstance(event, str) and on_delta is not None:
                on_delta(event)
        answer = event.text.strip()
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", "--model_path", required=True,
                        help="any checkpoint: full model, LoRA folder or stage-1 projector folder")
    parser.add_argument("--model-base", "--model_base", default=None)
    parser.add_argument("--image-file", "--image_file", nargs="+", default=[],
                        help="the image(s) to talk about (optional; several: one <image> marker each, in order)")
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
    image_urls = [data_url(path) for path in args.image_file]  # a missing file fails before the model loads
    limits = Limits(max_new_tokens_limit=max(args.max_new_tokens, Limits.max_new_tokens_limit))
    model = ServedModel.resolve(load_pretrained_model(args.model_path, model_base=args.model_base, device=args.device),
                                args.conv_mode, limits, args.image_aspect_ratio, args.image_background)
    engine = Engine(model, max_batch_size=1)
    chat = ChatSession(engine, image_urls, args.temperature, args.top_p, args.seed, args.max_new_tokens)
    try:
        if args.query is not None:
            try:
                print(chat.ask(args.query), file=stdout, flush=True)
            except (ApiError, ValidationError) as error:
                print(f"error: {_message(error)}", file=sys.stderr, flush=True)
                return 2
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
            try:
                if interactive:  # the answer appears as it is generated
                    chat.ask(text, on_delta=lambda piece: print(piece, end="", file=stdout, flush=True))
                    print(file=stdout, flush=True)
                else:
                    print(chat.ask(text), file=stdout, flush=True)
            except (ApiError, ValidationError) as error:  # the conversation goes on without this question
                print(f"error: {_message(error)}", file=stdout, flush=True)
    finally:
        engine.close()
    return 0


def _message(error: Exception) -> str:
    if isinstance(error, ValidationError):  # a flag out of the API's range, e.g. --temperature 3
        first = error.errors()[0]
        return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
    return error.message


if __name__ == "__main__":
    sys.exit(main())
