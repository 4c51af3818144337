"""An OpenAI-compatible API for any checkpoint this project trains (FastAPI + uvicorn, `pip install .[serve]`).

    python -m llava_tiny.serve.api --model-path runs/lora [--model-base ...] [--host 127.0.0.1] [--port 8000]
    LLAVA_TINY_API_KEY=secret python -m llava_tiny.serve.api --model-path runs/lora --host 0.0.0.0

Endpoints: `POST /v1/chat/completions` (text and base64 data-URL images, `stream: true` as
server-sent events), `GET /v1/models`, `GET /health`. Concurrent requests are batched (`engine.py`);
prompts are built as in training (`chat_request.py`). The server binds 127.0.0.1 unless told
otherwise, and refuses a non-loopback address without an API key unless `--insecure-no-api-key`.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..images import add_image_flags
from ..templates import template_name_problems
from .chat_request import ApiError, ChatRequest, prepare
from .engine import Completion, Engine
from .served import Limits, ServedModel

API_KEY_ENV = "LLAVA_TINY_API_KEY"
logger = logging.getLogger("llava_tiny.serve.api")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app reads it, by its
    Content-Length, or (chunked) by counting it in, never holding more than `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await _too_large(self.max_bytes)(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await _too_large(self.max_bytes)(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def _too_large_message(max_bytes: int) -> str:
    return f"the request body is over {max_bytes} bytes (--max-request-bytes)"


def _too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse(ApiError(413, _too_large_message(max_bytes), "request_too_large").body(), status_code=413)


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", "invalid_json")
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request", param)


def create_app(engine: Engine, model_id: str, api_key: str | None = None,
               max_request_bytes: int = 20 * 2**20) -> FastAPI:
    """The FastAPI app serving `engine`'s model (with its limits, `engine.model.limits`) under the name `model_id`."""
    app = FastAPI(title="llava-tiny", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        error = _validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code).body(), status_code=exc.status_code)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           "invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "batches": engine.batches_run, "largest_batch": engine.largest_batch}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "llava-tiny"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest):
        if body.model != model_id:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {model_id!r}",
                           "model_not_found", "model")
        prompt, sampling = await run_in_threadpool(prepare, engine.model, body)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = engine.submit(prompt, sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                                stream=bool(body.stream))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(events, request, head, usage), media_type="text/event-stream")
        try:
            while not isinstance(event := await events.get(), (Completion, BaseException)):
                pass
        finally:
            request.cancel()  # a client that went away stops its row (no-op once finished)
        if isinstance(event, BaseException):
            raise ApiError(500, f"generation failed: {event}", "generation_failed", type="server_error")
        return {**head, "object": "chat.completion", "usage": _usage(event),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text, "refusal": None},
                             "finish_reason": event.finish_reason, "logprobs": None}]}

    app.state.engine = engine
    return app


def _usage(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _sse(events: asyncio.Queue, request, head: dict, include_usage: bool):
    """`chat.completion.chunk` events: the role, content deltas, the finish reason, usage if asked, [DONE]."""

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, str):
                yield chunk({"content": event})
            elif isinstance(event, Completion):
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(event)})}\n\n"
                break
            else:
                error = ApiError(500, f"generation failed: {event}", "generation_failed", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", "--model_path", required=True, help="any checkpoint: full, LoRA or projector")
    parser.add_argument("--model-base", "--model_base", default=None)
    parser.add_argument("--served-model-name", default=None, help="the `model` clients name (default: the folder name)")
    parser.add_argument("--conv-mode", "--conv_mode", default=None, help="chat template (default: the checkpoint's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; prefer the variable, "
                             "a command line is visible to other users)")
    parser.add_argument("--insecure-no-api-key", action="store_true",
                        help="allow a non-loopback --host without an API key (anyone who reaches it can use it)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests per generation batch")
    parser.add_argument("--max-request-bytes", type=int, default=20 * 2**20, help="413 above this body size")
    parser.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels,
                        help="width x height above which an image is refused (decompression bombs)")
    parser.add_argument("--max-images", type=int, default=Limits.max_images, help="images per request")
    parser.add_argument("--max-new-tokens-limit", type=int, default=Limits.max_new_tokens_limit,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, default=Limits.default_max_tokens,
                        help="new tokens when a request does not say")
    add_image_flags(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parse_checked(parser, argv, flag_problems)


def parse_checked(parser: argparse.ArgumentParser, argv, problems_of) -> argparse.Namespace:
    """`parser`'s arguments; if `problems_of(args)` finds any, argparse's usage error listing every one."""
    args = parser.parse_args(argv)
    problems = problems_of(args)
    if problems:
        parser.error("invalid flags:\n  " + "\n  ".join(problems))
    return args


def flag_problems(args: argparse.Namespace) -> list[str]:
    """Every problem with the server's flags, each naming its flag: checked once, before the model loads."""
    problems = template_name_problems("--conv-mode", args.conv_mode)
    for flag, value, least in (("--max-batch-size", args.max_batch_size, 1), ("--max-images", args.max_images, 0),
                               ("--max-request-bytes", args.max_request_bytes, 1),
                               ("--max-image-pixels", args.max_image_pixels, 1),
                               ("--max-new-tokens-limit", args.max_new_tokens_limit, 1),
                               ("--default-max-tokens", args.default_max_tokens, 1)):
        if value < least:
            problems.append(f"{flag} {value}: expected at least {least}")
    if args.default_max_tokens > args.max_new_tokens_limit:
        problems.append(f"--default-max-tokens {args.default_max_tokens} is over --max-new-tokens-limit "
                        f"{args.max_new_tokens_limit}, the most a request may ask for")
    if not is_loopback(args.host) and not args.api_key and not args.insecure_no_api_key:
        problems.append(f"--host {args.host} is reachable from other machines and no API key is set: pass --api-key "
                        f"(or set {API_KEY_ENV}), or --insecure-no-api-key to serve it open")
    return problems


def main(argv=None) -> int:
    """Load the model, start the engine, serve until interrupted."""
    import uvicorn

    from ..model.builder import load_pretrained_model

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                    max_new_tokens_limit=args.max_new_tokens_limit, default_max_tokens=args.default_max_tokens)
    model = ServedModel.resolve(load_pretrained_model(args.model_path, model_base=args.model_base, device=args.device),
                                args.conv_mode, limits, args.image_aspect_ratio, args.image_background)
    engine = Engine(model, args.max_batch_size)
    model_id = args.served_model_name or os.path.basename(os.path.normpath(args.model_path))
    app = create_app(engine, model_id, args.api_key, args.max_request_bytes)
    logger.info("serving %s (%s) on http://%s:%d, API key %s", model_id, model.describe(), args.host, args.port,
                "required" if args.api_key else "off")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
