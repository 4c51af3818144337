"""The server against its peer, the official OpenAI OpenAPI document (github.com/openai/openai-openapi,
commit f85dbe223d40e1a31cba812ab2d755c7e98a92a3, operation createChatCompletion), vendored in
tests/fixtures/openai_chat_completion_schemas.json by tests/fixtures/extract_openai_chat_schemas.py.

Requests generated from the document's request schema (schemathesis, a fixed derandomized budget) go to a
real server on loopback: as the document writes them (every field, every kind of message), and steered
to what this server serves (the same schema with `messages` drawn from a few conversations, `max_tokens`
within the server's limit, and each field the server cannot honour null or a value that asks for
nothing), so that most of them are answered. No answer is a 5xx; every 2xx body and every chunk of a
stream validates against the document's response schemas; every 4xx is OpenAI's error shape naming a
field of the request; a request with null fields is answered as the same request without them."""
import base64
import collections
import copy
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
jsonschema = pytest.importorskip("jsonschema")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from llava_tiny.model.builder import load_pretrained_model  # noqa: E402
from llava_tiny.serve import api  # noqa: E402
from llava_tiny.serve.chat_request import UNSUPPORTED_FIELDS, Limits  # noqa: E402
from llava_tiny.serve.engine import Engine  # noqa: E402
from llava_tiny.serve.served import ServedModel  # noqa: E402
from llava_tiny.serve.launch import free_port  # noqa: E402

DOCUMENT = json.loads(Path(__file__).with_name("fixtures").joinpath("openai_chat_completion_schemas.json").read_text())
COMPONENTS = DOCUMENT["components"]
SCHEMAS = COMPONENTS["schemas"]
MODEL, MAX_TOKENS_LIMIT = "tiny-vlm", 4
SPEC_BUDGET, STEERED_BUDGET = 30, 170  # examples; the document's own messages cost ~0.25 s each to draw


def png_url(size=(20, 16)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CONVERSATIONS = [
    [{"role": "user", "content": "What is shown?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}},
                                  {"type": "text", "text": "What color is it?"}]}],
    [{"role": "developer", "content": [{"type": "text", "text": "Be kind."}]}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}],
]


def validator(name: str) -> "jsonschema.Draft202012Validator":
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": COMPONENTS})


REQUEST, RESPONSE = validator("CreateChatCompletionRequest"), validator("CreateChatCompletionResponse")
CHUNK = validator("CreateChatCompletionStreamResponse")


def request_properties(schemas: dict, name: str = "CreateChatCompletionRequest") -> list[dict]:
    """The `properties` maps that make up a schema through its `allOf` and `$ref` chain."""
    schema, found = schemas[name], []
    for part in [schema, *schema.get("allOf", ())]:
        if "$ref" in part:
            found += request_properties(schemas, part["$ref"].rsplit("/", 1)[1])
        elif "properties" in part:
            found.append(part["properties"])
    return found


def nullable_request_fields() -> list[str]:
    return sorted({name for properties in request_properties(SCHEMAS) for name, schema in properties.items()
                   if jsonschema.Draft202012Validator({**schema, "components": COMPONENTS}).is_valid(None)})


def steered_document() -> dict:
    """The document with the request schema narrowed to what this server answers (see the docstring)."""
    document = copy.deepcopy(DOCUMENT)
    for properties in request_properties(document["components"]["schemas"]):
        for name in properties:
            if name in UNSUPPORTED_FIELDS:
                properties[name] = {"enum": [None, *UNSUPPORTED_FIELDS[name]]}
            elif name == "messages":
                properties[name] = {"enum": CONVERSATIONS}
            elif name in ("max_tokens", "max_completion_tokens"):
                properties[name] = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS_LIMIT}
    return document


def generated_requests(document: dict):
    return schemathesis.openapi.from_dict(document)["/chat/completions"]["POST"].as_strategy()


@pytest.fixture(scope="module")
def http(model_dir):
    """The API on a real uvicorn on loopback, in this process: a server process spends ~20 s importing."""
    engine = Engine(ServedModel.resolve(load_pretrained_model(model_dir, device="cpu"),
                                        limits=Limits(max_new_tokens_limit=MAX_TOKENS_LIMIT, default_max_tokens=2)))
    app = api.create_app(engine, MODEL)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


@dataclass
class Answer:
    status: int
    streamed: bool
    nulls: bool
    code: str | None  # the error's code for a 4xx


def post(http, body: dict) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body)


def check_answer(http, body: dict) -> Answer:
    """Send `body`; the answer must be a spec-valid 2xx or an OpenAI-shaped 4xx naming a field."""
    response = post(http, body)
    assert response.status_code < 500, (body, response.text)
    streamed = response.headers["content-type"].startswith("text/event-stream")
    if response.status_code == 200 and streamed:
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2, response.text
        for event in events[:-1]:
            CHUNK.validate(json.loads(event))
    elif response.status_code == 200:
        RESPONSE.validate(response.json())
    code = None if response.status_code == 200 else refused(response, body)["code"]
    nulls = [name for name, value in body.items() if value is None]
    if nulls and response.status_code != 200:  # null means the default: refused the same without it
        again = post(http, {name: value for name, value in body.items() if value is not None})
        assert again.status_code == response.status_code, (nulls, response.text, again.text)
        assert again.json()["error"]["param"] == response.json()["error"]["param"], (response.text, again.text)
    return Answer(response.status_code, streamed, bool(nulls), code)


def refused(response: httpx.Response, body: dict) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"], error
    assert re.split(r"[.\[]", error["param"] or "")[0] in body, (error, body)  # names a field of the request
    return error


def run(strategy, budget: int, send) -> None:
    """Draw `budget` requests (derandomized: the same ones every run) and hand each to `send`."""
    @settings(max_examples=budget, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case):
        send({**case.body, "model": MODEL})

    one()


def test_requests_generated_from_the_openai_document(http):
    assert DOCUMENT["x-vendored-from"]["commit"] in __doc__  # the docstring names the peer's version
    spec, steered = [], []
    # Sent while the next ones are drawn, several at a time as clients do: the server batches them.
    with ThreadPoolExecutor(max_workers=8) as pool:
        run(generated_requests(DOCUMENT), SPEC_BUDGET, lambda body: spec.append(pool.submit(check_answer, http, body)))
        run(generated_requests(steered_document()), STEERED_BUDGET,  # every other one streamed unless it says
            lambda body: steered.append(pool.submit(check_answer, http, {"stream": len(steered) % 2 == 1, **body})))
        spec, steered = [f.result() for f in spec], [f.result() for f in steered]
    answers = spec + steered
    ok = [a for a in answers if a.status == 200]
    print(f"\n{len(answers)} requests ({len(spec)} as the document writes them, {len(steered)} steered): "
          f"{len(ok)} 2xx ({sum(a.streamed for a in ok)} streamed), {len(answers) - len(ok)} 4xx; "
          f"{sum(a.nulls for a in answers)} with null fields, {sum(a.nulls for a in ok)} of them 2xx; 4xx codes: "
          f"{collections.Counter(a.code for a in answers if a.code).most_common()}")
    assert len(answers) >= SPEC_BUDGET + STEERED_BUDGET * 0.9
    assert len(ok) >= STEERED_BUDGET // 2 and sum(a.streamed for a in ok) >= 20
    assert sum(a.nulls for a in ok) >= 40


def test_every_nullable_field_null_at_once_is_the_default(http):
    nullable = nullable_request_fields()
    assert {"stream", "temperature", "top_p", "n", "stop", "seed", "max_tokens", "max_completion_tokens",
            "stream_options", "logprobs", "audio"} <= set(nullable)
    body = {"model": MODEL, "messages": CONVERSATIONS[1], **{name: None for name in nullable}}
    response = post(http, body)
    assert response.status_code == 200, response.text
    RESPONSE.validate(response.json())
    default = post(http, {"model": MODEL, "messages": CONVERSATIONS[1]}).json()
    assert response.json()["usage"] == default["usage"]  # the defaults: 2 new tokens (default_max_tokens)
    assert check_answer(http, {**body, "stream": True, "temperature": 0}).status == 200


# A value each field allows in the document that asks for what this server cannot do.
UNSUPPORTED_REQUESTS = {
    "n": 2, "logprobs": True, "top_logprobs": 3, "frequency_penalty": 0.5, "presence_penalty": -1,
    "logit_bias": {"42": 5}, "tools": [{"type": "function", "function": {"name": "lookup"}}],
    "tool_choice": "required", "functions": [{"name": "lookup"}], "function_call": {"name": "lookup"},
    "response_format": {"type": "json_object"}, "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "web_search_options": {}, "moderation": {"model": "x"},
}


def test_what_the_server_cannot_honour_is_refused_by_name_and_neutral_values_are_accepted(http):
    assert set(UNSUPPORTED_REQUESTS) == set(UNSUPPORTED_FIELDS)
    for name, value in UNSUPPORTED_REQUESTS.items():
        body = {"model": MODEL, "messages": CONVERSATIONS[0], name: value}
        REQUEST.validate(body)
        response = post(http, body)
        assert response.status_code == 400, (name, response.text)
        error = refused(response, body)
        assert error["param"] == name and error["code"] == "unsupported_parameter" and name in error["message"]
    neutral = {name: values[0] for name, values in UNSUPPORTED_FIELDS.items() if values}
    REQUEST.validate({"model": MODEL, "messages": CONVERSATIONS[0], **neutral})
    assert check_answer(http, {"model": MODEL, "messages": CONVERSATIONS[0], **neutral}).status == 200


def test_edges_the_document_allows_are_answered(http):
    """A seed below -2**63 (the document's minimum is) and temperatures so small that logits overflow."""
    for extra in ({"seed": -9223372036854775999, "temperature": 1}, {"seed": 2**63 - 1, "temperature": 0.5},
                  {"temperature": 5e-324}, {"temperature": 1e-6, "top_p": 1e-300}):
        REQUEST.validate({"model": MODEL, "messages": CONVERSATIONS[0], **extra})
        assert check_answer(http, {"model": MODEL, "messages": CONVERSATIONS[0], **extra}).status == 200, extra
