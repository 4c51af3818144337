"""OpenAI chat-completion requests as this project's prompts: the messages become the (question,
answer) turns, images and template prompt that training used; every bad input is an `ApiError`
with OpenAI's error shape and a 4xx status.

Messages are read by the reader data files use (`messages.read_messages`): a user message's images
go before its text, one `<image>` marker each (LLaVA's training data puts the image first);
`<image>` typed by a client is removed, since markers are ours to place (`templates.turn_text`). A
system message replaces the template's own system sentence, or leads the first question when the
template has none. Images come only as base64 data URLs: the server never fetches a URL.

Requests are read as OpenAI's API document (openai/openai-openapi) writes them: JSON null for a field
means its default, as if the field were absent (`ChatRequest._null_means_default`, the one place);
a field this server cannot honour is refused with a 400 naming it unless its value asks for nothing
(`UNSUPPORTED_FIELDS`); the document's other fields (`user`, `metadata`, `store`, `service_tier`,
`prompt_cache_key`, `reasoning_effort`, ...) cannot change a local model's answer and are ignored.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import mimetypes
import re
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..images import load_image
from ..messages import read_messages
from ..inference import Prompt
from .engine import Sampling
from .served import Limits, ServedModel, context_length  # noqa: F401 (Limits and context_length re-exported)

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
# Fields of OpenAI's request that this server cannot honour, each with the values that ask for nothing
# (accepted); any other value is a 400 naming the field: silently dropping a tool list or a JSON mode
# would answer a question the client did not ask.
UNSUPPORTED_FIELDS = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "frequency_penalty": (0,), "presence_penalty": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "functions": (),
    "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
    "audio": (), "web_search_options": (), "moderation": (),
}
# Below this a temperature is greedy, as in vLLM: dividing the logits by less overflows them to inf.
GREEDY_BELOW = 1e-5
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)


class ApiError(Exception):
    """A request the server refuses: `status`, and OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat-completion request that change the answer; the others are kept in
    `model_extra` (refused by `refuse_unsupported` when they ask for what this server cannot do)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        """OpenAI's document marks most fields nullable, meaning "the default"; clients generated from it
        and several SDKs send nulls. A required field keeps its null, to be refused by name."""
        if not isinstance(data, dict):
            return data
        return {name: value for name, value in data.items()
                if value is not None or (name in cls.model_fields and cls.model_fields[name].is_required())}


def refuse_unsupported(request: ChatRequest) -> None:
    """A 400 naming the first field whose value asks for what this server cannot do."""
    for name, neutral in UNSUPPORTED_FIELDS.items():
        value = (request.model_extra or {}).get(name)
        # `False == 0` in Python, yet `logprobs: 0` or `frequency_penalty: false` is not what the document allows
        if value is not None and not any(value == ok and isinstance(value, bool) == isinstance(ok, bool)
                                         for ok in neutral):
            accepted = ", ".join(["null", *(json.dumps(ok) for ok in neutral)])
            raise ApiError(400, f"{name} is not supported by this server (accepted: {accepted})",
                           "unsupported_parameter", name)


def data_url(path: str) -> str:
    """An image file as a base64 data URL (how requests carry images: the web chat's uploads, the CLI's file)."""
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def decode_image(url: str, param: str, max_pixels: int) -> Image.Image:
    """A PNG/JPEG/WebP image from a base64 data URL; the size is checked before any pixel is decoded."""
    if not isinstance(url, str):
        raise ApiError(400, "image_url.url must be a string", "invalid_image_url", param)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise ApiError(400, "image URLs are not fetched by this server; send the image inline as a data URL "
                            "(data:image/png;base64,...)", "image_url_not_allowed", param)
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise ApiError(400, "image_url.url is not a base64 data URL; expected data:image/png;base64,... "
                            "(PNG, JPEG or WebP)", "invalid_image_url", param)
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data URL's base64 payload does not decode", "invalid_image_url", param) from None
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            found, size = img.format, img.size
    except Image.DecompressionBombError:
        raise ApiError(400, f"the image is larger than {max_pixels} pixels", "image_too_large", param) from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        raise ApiError(400, "the data URL does not hold a readable image (PNG, JPEG or WebP expected)",
                       "invalid_image", param) from None
    if found not in IMAGE_FORMATS:
        raise ApiError(400, f"image format {found}; expected one of PNG, JPEG, WebP", "invalid_image", param)
    if size[0] * size[1] > max_pixels:
        raise ApiError(400, f"the image is {size[0]}x{size[1]} = {size[0] * size[1]} pixels; the server takes "
                            f"at most {max_pixels} (--max-image-pixels)", "image_too_large", param)
    try:
        return load_image(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - a truncated or corrupt file fails on decoding
        raise ApiError(400, "the image does not decode (truncated or corrupt)", "invalid_image", param) from None


@dataclass
class Conversation:
    """Messages as turns: an optional system text, earlier (question, answer) pairs, the question."""

    system: str | None
    history: list[tuple[str, str]]
    question: str
    images: list[Image.Image]


def parse_messages(messages: list[dict], limits: Limits) -> Conversation:
    """The request's messages as turns + images (`messages.read_messages`, images inside their parts): system
    messages first, then user/assistant turns (consecutive ones of a role are joined), ending with a user
    message."""
    decoded = []

    def load(url, param: str):
        if len(decoded) >= limits.max_images:
            raise ApiError(400, f"more than {limits.max_images} images in one request (--max-images)",
                           "too_many_images", param)
        decoded.append(decode_image(url, param, limits.max_image_pixels))
        return decoded[-1]

    read = read_messages(messages, images_inline=True, load_image=load)
    if read.problems:
        problem = read.problems[0]
        raise ApiError(400, problem.message, problem.code, problem.param)
    turns = []
    for role, text in read.turns:
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "the conversation must start and end with a user message", "invalid_messages", "messages")
    if not turns[-1][1].strip():
        raise ApiError(400, "the last user message is empty; expected a question or an image", "invalid_messages",
                       "messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return Conversation((read.system or "").strip() or None, history, turns[-1][1], read.images)


def prepare(model: ServedModel, request: ChatRequest) -> tuple[Prompt, Sampling]:
    """Check a request against the model and its limits; the prompt and how to decode it."""
    refuse_unsupported(request)
    limits, context = model.limits, model.context
    conversation = parse_messages(request.messages, limits)
    too_many = model.image_tokens_problem(conversation.images) if conversation.images else None
    if too_many:
        raise ApiError(400, too_many, "too_many_images", "messages")
    try:
        # A system message replaces the template's system prompt, as a sample's own system message does in training.
        prompt = model.prompt(conversation.question, conversation.images, conversation.history, conversation.system)
    except ValueError as error:  # the prompt checks of build_prompt
        raise ApiError(400, str(error), "invalid_messages", "messages") from None
    asked = request.max_completion_tokens or request.max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if asked is not None and asked > limits.max_new_tokens_limit:
        raise ApiError(400, f"{param} is {asked}; this server allows at most {limits.max_new_tokens_limit} "
                            "(--max-new-tokens-limit)", "max_tokens_too_large", param)
    room = context - len(prompt.input_ids)
    max_tokens = asked or min(limits.default_max_tokens, limits.max_new_tokens_limit, room)
    if room < 1 or max_tokens > room:
        raise ApiError(400, f"the prompt is {len(prompt.input_ids)} tokens and {max_tokens} new tokens were asked "
                            f"for; the model holds {context}", "context_length_exceeded", "messages")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, "stop takes up to 4 non-empty strings", "invalid_stop", "stop")
    temperature = request.temperature if request.temperature >= GREEDY_BELOW else 0.0
    # The document allows any int64 seed (and a little below); torch takes [-2**63, 2**64).
    seed = None if request.seed is None else request.seed % 2**64
    return prompt, Sampling(max_tokens=max_tokens, temperature=temperature, top_p=request.top_p, stop=stop,
                            seed=seed)
