"""Several images per request and anyres models through the OpenAI-compatible server, called with the official
`openai` client: a request with two `image_url` parts of different sizes gets the answer of our batched generation
(`inference.generate_batch`, held to stock transformers in test_generate_images.py), and an image whose anyres token
count does not fit the model's context is refused with a 400 while the server keeps answering."""
import base64
import io

import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from conftest import ANYRES_CONTEXT  # noqa: E402
from llava_tiny.inference import GenerationSettings, ImageReader, build_prompt, generate_batch  # noqa: E402
from llava_tiny.model.builder import load_pretrained_model  # noqa: E402
from llava_tiny.serve.launch import ServerProcess  # noqa: E402

WIDE, SQUARE = Image.new("RGB", (150, 40), (200, 30, 30)), Image.effect_noise((56, 56), 60).convert("RGB")
HUGE = Image.new("RGB", (224, 224), (30, 30, 200))  # 4x4 tiles: 288 image tokens, over the context of 256


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def images_message(text, images):
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def anyres_server(anyres_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("logs") / "api.log")
    args = ["--model-path", anyres_dir, "--served-model-name", "next", "--log-level", "warning"]
    with ServerProcess("llava_tiny.serve.api", args, log, timeout=120) as process:
        yield process
        assert process.alive(), f"the server died:\n{process.log()[-3000:]}"


def _ask(server, messages):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    return client.chat.completions.create(model="next", messages=messages, max_tokens=8, temperature=0)


def test_two_images_of_an_anyres_model_answer_as_batched_generation(anyres_server, anyres_dir):
    loaded = load_pretrained_model(anyres_dir, device="cpu")
    question = "Do the two images show the same colour?"
    prompt = build_prompt(loaded, "<image>\n<image>\n" + question, [WIDE, SQUARE])
    expected = generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=8))[0]
    counts = ImageReader.of(loaded).counts([WIDE, SQUARE])
    assert counts[0] != counts[1]  # each image its own count
    response = _ask(anyres_server, [images_message(question, [WIDE, SQUARE])])
    assert response.choices[0].message.content == expected and expected
    assert response.usage.prompt_tokens == len(prompt.input_ids)


def test_an_image_too_large_for_the_context_is_refused_and_the_server_keeps_serving(anyres_server, anyres_dir):
    loaded = load_pretrained_model(anyres_dir, device="cpu")
    assert ImageReader.of(loaded).counts([HUGE]) == [288] and 288 > ANYRES_CONTEXT
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(anyres_server, [images_message("What colour is it?", [HUGE])])
    error = refused.value.response.json()["error"]
    assert error["code"] == "too_many_images" and "224x224: 288" in error["message"], error
    assert str(ANYRES_CONTEXT) in error["message"]
    assert _ask(anyres_server, [images_message("What colour is it?", [SQUARE])]).choices[0].message.content


def test_the_web_chat_backend_answers_two_images_and_refuses_an_image_too_large(anyres_dir):
    """The web chat's in-process backend (`web.local_backend`, the API's own request checks): the same answer as
    batched generation for two images of an anyres model; an image too large for the context is an `ApiError`
    (400) shown to the user, and the next question is answered."""
    from llava_tiny.serve.chat_request import ApiError
    from llava_tiny.serve.engine import Engine
    from llava_tiny.serve.served import ServedModel
    from llava_tiny.serve.web import local_backend

    loaded = load_pretrained_model(anyres_dir, device="cpu")
    engine = Engine(ServedModel.resolve(loaded))
    try:
        answer = local_backend(engine, temperature=0.0, max_tokens=8)
        question = "Do the two images show the same colour?"
        prompt = build_prompt(loaded, "<image>\n<image>\n" + question, [SQUARE, WIDE])
        expected = generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=8))[0]
        assert "".join(answer([images_message(question, [SQUARE, WIDE])])).strip() == expected.strip()
        with pytest.raises(ApiError) as refused:
            list(answer([images_message("What colour is it?", [HUGE])]))
        assert refused.value.status == 400 and "288" in refused.value.message
        alone = build_prompt(loaded, "<image>\nWhat colour is it?", [WIDE])
        assert "".join(answer([images_message("What colour is it?", [WIDE])])).strip() == \
            generate_batch(loaded, [alone], GenerationSettings(max_new_tokens=8))[0].strip()
    finally:
        engine.close()
