"""The OpenAI-compatible server, started for real (uvicorn on a free loopback port) and called with the
official `openai` client: answers equal the evaluation path's, streaming equals non-streaming, every
bad input gets a 4xx in OpenAI's error shape and the next good request still succeeds."""
import base64
import io
import json
import threading

import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llava_tiny.inference import GenerationSettings, Prompt, build_prompt, generate_batch  # noqa: E402
from llava_tiny.model.builder import load_pretrained_model  # noqa: E402
from llava_tiny.serve import api  # noqa: E402
from llava_tiny.serve.launch import ServerProcess  # noqa: E402

KEY = "test-key-4f1c"
MAX_BYTES, MAX_PIXELS, MAX_IMAGES, MAX_TOKENS_LIMIT = 300_000, 200_000, 3, 48
RED = Image.new("RGB", (70, 56), (200, 30, 30))


def png_url(image=RED, fmt="PNG", mime="image/png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_message(text, url=None):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or png_url()}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_pretrained_model(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One server for the module; it must still be alive after every test."""
    log = str(tmp_path_factory.mktemp("logs") / "api.log")
    args = ["--model-path", model_dir, "--max-request-bytes", str(MAX_BYTES), "--max-image-pixels", str(MAX_PIXELS),
            "--max-images", str(MAX_IMAGES), "--max-new-tokens-limit", str(MAX_TOKENS_LIMIT),
            "--default-max-tokens", "12", "--log-level", "warning"]
    with ServerProcess("llava_tiny.serve.api", args, log, env={api.API_KEY_ENV: KEY}, timeout=120) as process:
        yield process
        assert process.alive(), f"the server died:\n{process.log()[-3000:]}"
    assert KEY not in process.log()  # the key is never logged


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(loaded, question, images=(), history=(), max_new_tokens=12):
    prompt = build_prompt(loaded, question, list(images), list(history))
    return generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=max_new_tokens))[0], prompt


def ask(client, messages, **kwargs):
    kwargs = {"max_tokens": 12, "temperature": 0, **kwargs}
    return client.chat.completions.create(model="tiny-vlm", messages=messages, **kwargs)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-vlm"]
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_plain_answer_equals_the_evaluation_path_with_usage(client, loaded):
    answer, prompt = expected(loaded, "What is two and three?")
    response = ask(client, [{"role": "user", "content": "What is two and three?"}])
    assert response.choices[0].message.content == answer and answer
    assert response.choices[0].finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens == len(prompt.input_ids)
    assert 1 <= usage.completion_tokens <= 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_deltas_concatenate_to_the_answer(client):
    messages = [image_message("Describe the picture.")]
    whole = ask(client, messages, max_tokens=16)
    chunks = list(ask(client, messages, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_image_as_a_data_url(client, loaded, fmt, mime):
    url = png_url(RED, fmt, mime)
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    answer, prompt = expected(loaded, "<image>\nWhat color is it?", [image])
    response = ask(client, [image_message("What color is it?", url)])
    assert response.choices[0].message.content == answer
    assert response.usage.prompt_tokens == len(prompt.input_ids)


def test_multi_turn_conversation_keeps_the_history(client, loaded):
    first, _ = expected(loaded, "<image>\nWhat color is it?", [RED])
    second, _ = expected(loaded, "And the shape?", [RED], [("<image>\nWhat color is it?", first)])
    messages = [image_message("What color is it?"), {"role": "assistant", "content": first},
                {"role": "user", "content": "And the shape?"}]
    assert ask(client, messages).choices[0].message.content == second
    alone, _ = expected(loaded, "And the shape?")
    assert alone != second  # the history changed the answer


def test_system_message_replaces_the_template_system_sentence(client, loaded):
    ids = build_prompt(loaded, "Hi?", system="Answer in one word.").input_ids
    default = build_prompt(loaded, "Hi?").input_ids
    assert ids != default and loaded.tokenizer.decode(ids).count("Answer in one word.") == 1
    answer = generate_batch(loaded, [Prompt(ids)], GenerationSettings(max_new_tokens=12))[0]
    response = ask(client, [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi?"}])
    assert response.choices[0].message.content == answer and response.usage.prompt_tokens == len(ids)


def test_stop_string_cuts_the_answer(client):
    full = ask(client, [{"role": "user", "content": "Count for me."}], max_tokens=16).choices[0].message.content
    words = full.split()
    assert len(words) > 2
    stop = words[2]
    response = ask(client, [{"role": "user", "content": "Count for me."}], max_tokens=16, stop=[stop])
    assert response.choices[0].message.content == full[:full.index(stop)].rstrip()
    assert response.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_equal_each_request_alone(client, loaded, server):
    questions = [f"Question number {i}: what is shown?" for i in range(10)]
    alone = [expected(loaded, f"<image>\n{q}", [RED], max_new_tokens=24)[0] for q in questions[:5]]
    alone += [expected(loaded, q, max_new_tokens=24)[0] for q in questions[5:]]
    before = httpx.get(server.url + "/health", timeout=10).json()["batches"]
    answers, start = [None] * len(questions), threading.Barrier(len(questions))

    def one(i):
        start.wait(timeout=30)
        message = image_message(questions[i]) if i < 5 else {"role": "user", "content": questions[i]}
        answers[i] = ask(client, [message], max_tokens=24).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == alone
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["largest_batch"] > 1 and health["batches"] - before < len(questions)


def _error(exc_info, status, code):
    error = exc_info.value
    assert error.status_code == status, error.response.text
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert body["error"]["code"] == code, body
    return body["error"]


BIG = Image.effect_noise((600, 600), 64).convert("RGB")  # 360k pixels, over MAX_PIXELS
BAD_REQUESTS = {
    "remote url": ([image_message("hi", "https://example.com/a.png")], {}, 400, "image_url_not_allowed"),
    "file url": ([image_message("hi", "file:///etc/passwd")], {}, 400, "image_url_not_allowed"),
    "not a data url": ([image_message("hi", "/etc/passwd")], {}, 400, "invalid_image_url"),
    "not an image": ([image_message("hi", "data:image/png;base64," + base64.b64encode(b"hello").decode())], {},
                     400, "invalid_image"),
    "gif": ([image_message("hi", png_url(RED, "GIF", "image/gif"))], {}, 400, "invalid_image"),
    "too many pixels": ([image_message("hi", png_url(Image.new("RGB", (500, 500))))], {}, 400, "image_too_large"),
    "too many images": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}}] * 4}],
                        {}, 400, "too_many_images"),
    "prompt too long": ([{"role": "user", "content": "red " * 2100}], {}, 400, "context_length_exceeded"),
    "max_tokens over the limit": ([{"role": "user", "content": "hi"}], {"max_tokens": 49}, 400,
                                  "max_tokens_too_large"),
    "ends with assistant": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], {}, 400,
                            "invalid_messages"),
    "tool role": ([{"role": "tool", "content": "x", "tool_call_id": "1"}], {}, 400, "invalid_messages"),
    "bad temperature": ([{"role": "user", "content": "hi"}], {"temperature": 7}, 400, "invalid_request"),
    "n > 1": ([{"role": "user", "content": "hi"}], {"n": 2}, 400, "unsupported_parameter"),
    "body too large": ([image_message("hi", png_url(BIG))], {}, 413, "request_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error_then_the_server_still_answers(client, server, name):
    messages, kwargs, status, code = BAD_REQUESTS[name]
    with pytest.raises(openai.APIStatusError) as exc_info:
        ask(client, messages, **kwargs)
    _error(exc_info, status, code)
    assert server.alive()
    assert ask(client, [{"role": "user", "content": "hi"}]).choices[0].message.content


def test_malformed_json_unknown_model_and_api_key(client, server):
    url = server.url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(url, content=b'{"model": "tiny-vlm", "messages": [', timeout=30,
                          headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.post(url, json={"model": "tiny-vlm"}, headers=auth, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as exc_info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert _error(exc_info, 404, "model_not_found")["param"] == "model"
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.post(url, json={"model": "tiny-vlm", "messages": [{"role": "user", "content": "hi"}]},
                              headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert ask(client, [{"role": "user", "content": "hi"}]).choices[0].message.content


def test_exposed_address_needs_a_key_or_an_explicit_insecure_flag(monkeypatch, capsys):
    monkeypatch.delenv(api.API_KEY_ENV, raising=False)
    with pytest.raises(SystemExit):
        api.parse_args(["--model-path", "m", "--host", "0.0.0.0"])
    assert "--insecure-no-api-key" in capsys.readouterr().err
    assert api.parse_args(["--model-path", "m"]).host == "127.0.0.1"
    assert api.parse_args(["--model-path", "m", "--host", "0.0.0.0", "--api-key", "k"]).api_key == "k"
    assert api.parse_args(["--model-path", "m", "--host", "0.0.0.0", "--insecure-no-api-key"]).api_key is None
    monkeypatch.setenv(api.API_KEY_ENV, "from-env")
    assert api.parse_args(["--model-path", "m", "--host", "::"]).api_key == "from-env"
    assert api.is_loopback("::1") and api.is_loopback("127.0.0.2") and not api.is_loopback("example.com")


def test_server_flags_are_checked_at_once_before_the_model_loads(monkeypatch, capsys):
    """Every problem with the server's flags in one message, from parse_args, before main loads a model (an
    unknown --conv-mode used to surface only after the model had loaded)."""
    monkeypatch.delenv(api.API_KEY_ENV, raising=False)
    with pytest.raises(SystemExit):
        api.main(["--model-path", "no-such-folder", "--conv-mode", "nope", "--max-batch-size", "0",
                  "--default-max-tokens", "5000", "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    for expected in ("--conv-mode: unknown conversation template 'nope'", "--max-batch-size 0: expected at least 1",
                     "--default-max-tokens 5000 is over --max-new-tokens-limit 1024", "--insecure-no-api-key"):
        assert expected in err, err


def test_streamed_sse_wire_format(server):
    body = {"model": "tiny-vlm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_two_images_in_one_message_answer_as_the_evaluation_path(client, loaded):
    other = Image.effect_noise((56, 80), 60).convert("RGB")
    answer, prompt = expected(loaded, "<image>\n<image>\nDo the two images show the same colour?", [RED, other])
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url()}},
                                           {"type": "image_url", "image_url": {"url": png_url(other)}},
                                           {"type": "text", "text": "Do the two images show the same colour?"}]}
    response = ask(client, [message])
    assert response.choices[0].message.content == answer
    assert response.usage.prompt_tokens == len(prompt.input_ids)
