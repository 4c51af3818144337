"""A web chat about images (Gradio, the convention of LLaVA's and TinyLLaVA's demos; `pip install .[serve]`).

    python -m llava_tiny.serve.web --model-path runs/lora                 # the model in this process
    python -m llava_tiny.serve.web --api-url http://127.0.0.1:8000/v1     # a running llava_tiny.serve.api

Upload or paste an image, ask; follow-up questions keep the conversation, answers stream in,
"Clear" starts over. Example images come from `--examples` (default: `examples/` in the model
folder; a `NAME.txt` next to `NAME.png` holds its question). The page names the checkpoint and
template in use. It binds 127.0.0.1; another address needs `--auth user:password` (or
$LLAVA_TINY_WEB_AUTH) or `--insecure-no-auth`.

Each conversation is kept in OpenAI's message format and answered through the same request
checks as the API (`chat_request.prepare`), so both give the same answer to the same question.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Iterator

from ..images import add_image_flags
from ..templates import template_name_problems
from .api import API_KEY_ENV, is_loopback, parse_checked
from .chat_request import data_url

AUTH_ENV = "LLAVA_TINY_WEB_AUTH"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_QUESTION = "Describe the image."


def find_examples(folder: str | None) -> list[dict]:
    """[{"text", "files"}] for each image in `folder`; its question from NAME.txt, else a default."""
    if not folder or not os.path.isdir(folder):
        return []
    examples = []
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in IMAGE_SUFFIXES:
            question_file = os.path.join(folder, stem + ".txt")
            question = open(question_file).read().strip() if os.path.isfile(question_file) else DEFAULT_QUESTION
            examples.append({"text": question, "files": [os.path.join(folder, name)]})
    return examples


def local_backend(engine, temperature: float, max_tokens: int) -> Callable[[list[dict]], Iterator[str]]:
    """Answer messages with an in-process engine, through the API's own request checks and the engine's limits."""
    from .chat_request import ChatRequest, prepare

    def answer(messages: list[dict]) -> Iterator[str]:
        request = ChatRequest(model="local", messages=messages, temperature=temperature, max_tokens=max_tokens)
        prompt, sampling = prepare(engine.model, request)
        yield from (event for event in engine.stream(prompt, sampling, timeout=600) if isinstance(event, str))

    return answer


def api_backend(client, model: str, temperature: float, max_tokens: int) -> Callable[[list[dict]], Iterator[str]]:
    """Answer messages through an OpenAI-compatible API (`client` is an `openai.OpenAI`)."""

    def answer(messages: list[dict]) -> Iterator[str]:
        stream = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                max_tokens=max_tokens, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return answer


def build_demo(answer: Callable[[list[dict]], Iterator[str]], description: str, examples: list[dict] = ()):
    """The Gradio Blocks app: a chatbot, a text box that takes images, and a Clear button."""
    import gradio as gr

    def respond(message: dict, chat: list, messages: list):
        files, text = message.get("files") or [], (message.get("text") or "").strip()
        if not files and not text:
            raise gr.Error("Type a question or add an image first.")
        parts = [{"type": "image_url", "image_url": {"url": data_url(path)}} for path in files]
        messages = [*messages, {"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
        chat = [*chat, *({"role": "user", "content": {"path": path}} for path in files)]
        chat = [*chat, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield gr.MultimodalTextbox(value=None, interactive=False), chat, messages
        reply = ""
        try:
            for delta in answer(messages):
                reply += delta
                chat[-1] = {"role": "assistant", "content": reply}
                yield gr.MultimodalTextbox(interactive=False), chat, messages
        except Exception as error:  # noqa: BLE001 - shown to the user; the chat stays usable
            chat, messages = chat[:-1], messages[:-1]
            yield gr.MultimodalTextbox(interactive=True), chat, messages
            raise gr.Error(getattr(error, "message", None) or str(error)) from None
        messages = [*messages, {"role": "assistant", "content": reply}]
        yield gr.MultimodalTextbox(interactive=True), chat, messages

    with gr.Blocks(title="llava-tiny chat") as demo:
        gr.Markdown(f"### llava-tiny chat\n{description}", elem_id="model-info")
        chatbot = gr.Chatbot(elem_id="chat", height=480, label="Conversation")
        history = gr.State([])
        box = gr.MultimodalTextbox(elem_id="question", file_types=["image"], file_count="multiple",
                                   placeholder="Add an image (upload or paste), then ask about it", show_label=False)
        clear = gr.Button("Clear", elem_id="clear")
        if examples:
            gr.Examples(examples=list(examples), inputs=box, label="Examples")
        box.submit(respond, [box, chatbot, history], [box, chatbot, history])
        clear.click(lambda: (None, [], []), None, [box, chatbot, history])
        chatbot.clear(lambda: [], None, history)  # the chatbot's own trash icon forgets the history too
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-path", "--model_path", help="serve this checkpoint in this process")
    source.add_argument("--api-url", help="talk to a running OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model-base", "--model_base", default=None)
    parser.add_argument("--conv-mode", "--conv_mode", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"for --api-url (default ${API_KEY_ENV})")
    parser.add_argument("--examples", default=None, help="folder of example images (default: MODEL/examples)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    add_image_flags(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=os.environ.get(AUTH_ENV), help=f"user:password (default ${AUTH_ENV})")
    parser.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without --auth")
    return parse_checked(parser, argv, flag_problems)


def flag_problems(args: argparse.Namespace) -> list[str]:
    """Every problem with the chat page's flags, each naming its flag: checked once, before the model loads."""
    problems = template_name_problems("--conv-mode", args.conv_mode)
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature}: expected 0 (greedy) or more")
    if args.auth and ":" not in args.auth:
        problems.append("--auth takes user:password")
    if not is_loopback(args.host) and not args.auth and not args.insecure_no_auth:
        problems.append(f"--host {args.host} is reachable from other machines: pass --auth user:password "
                        f"(or set {AUTH_ENV}), or --insecure-no-auth")
    return problems


def main(argv=None) -> int:
    """Start the backend (a local engine or an API client) and serve the chat page."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    import gradio as gr

    args = parse_args(argv)
    if args.api_url:
        import openai

        client = openai.OpenAI(base_url=args.api_url, api_key=args.api_key or "none", max_retries=0)
        model = client.models.list().data[0].id
        answer = api_backend(client, model, args.temperature, args.max_new_tokens)
        description, examples_dir = f"Model **{model}** served by `{args.api_url}`", args.examples
    else:
        from ..model.builder import load_pretrained_model
        from .engine import Engine
        from .served import Limits, ServedModel

        limits = Limits(max_new_tokens_limit=max(args.max_new_tokens, Limits.max_new_tokens_limit))
        model = ServedModel.resolve(load_pretrained_model(args.model_path, model_base=args.model_base,
                                                          device=args.device),
                                    args.conv_mode, limits, args.image_aspect_ratio, args.image_background)
        engine = Engine(model)
        answer = local_backend(engine, args.temperature, args.max_new_tokens)
        description = f"Checkpoint `{os.path.abspath(args.model_path)}` ({model.loaded.kind}), template `{model.template.name}`"
        examples_dir = args.examples or os.path.join(args.model_path, "examples")
    demo = build_demo(answer, description, find_examples(examples_dir))
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    # System fonts: the default theme would ask Google Fonts for its typeface.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.queue().launch(server_name=args.host, server_port=args.port, auth=auth, share=False, theme=theme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
