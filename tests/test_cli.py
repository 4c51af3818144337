"""The chat CLI answers scripted questions, once (--query) or interactively with history."""
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch
from llava_tiny.model.builder import load_pretrained_model
from llava_tiny.serve import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = ["--temperature", "0", "--max-new-tokens", "10"]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    image = Image.new("RGB", (70, 56), (200, 30, 30))
    image.paste((20, 40, 220), (0, 0, 30, 56))
    image.save(path)
    return str(path)


def _expected(model_dir, image_file, turns):
    """Greedy answers computed directly: each question after the earlier (question, answer) turns."""
    loaded = load_pretrained_model(model_dir, device="cpu")
    image = Image.open(image_file).convert("RGB")
    settings = GenerationSettings(max_new_tokens=10)
    history, answers = [], []
    for i, question in enumerate(turns):
        question = f"<image>\n{question}" if i == 0 else question
        answer = generate_batch(loaded, [build_prompt(loaded, question, [image], history)], settings)[0]
        history.append((question, answer))
        answers.append(answer)
    return answers


def test_query_answers_once_in_a_subprocess(model_dir, image_file):
    out = subprocess.run([sys.executable, "-m", "llava_tiny.serve.cli", "--model-path", model_dir,
                          "--image-file", image_file, "--query", "What color is it?", *GREEDY],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = _expected(model_dir, image_file, ["What color is it?"])[0]
    assert expected and out.stdout == expected + "\n"


def test_interactive_chat_keeps_history_until_exit(model_dir, image_file):
    stdin = io.StringIO("What color is it?\n\nAnd what shape?\nexit\nThis is never asked.\n")
    stdout = io.StringIO()
    assert cli.main(["--model-path", model_dir, "--image-file", image_file, *GREEDY], stdin=stdin, stdout=stdout) == 0
    first, second = _expected(model_dir, image_file, ["What color is it?", "And what shape?"])
    assert stdout.getvalue() == f"ASSISTANT: {first}\nASSISTANT: {second}\n"
    # The second answer depends on the first turn: asked alone, the model says something else.
    alone = _expected(model_dir, image_file, ["And what shape?"])[0]
    assert alone != second


def test_interactive_chat_ends_at_eof_and_works_without_an_image(model_dir):
    stdout = io.StringIO()
    assert cli.main(["--model-path", model_dir, *GREEDY], stdin=io.StringIO("Hello <image> there?"),
                    stdout=stdout) == 0
    loaded = load_pretrained_model(model_dir, device="cpu")
    expected = generate_batch(loaded, [build_prompt(loaded, "Hello  there?")], GenerationSettings(max_new_tokens=10))
    assert stdout.getvalue() == f"ASSISTANT: {expected[0]}\n"


def test_two_images_of_an_anyres_model(anyres_dir, image_file, tmp_path):
    """`--image-file a b` on an anyres folder: the answer of batched generation with both images, each its own
    count of image tokens."""
    second = tmp_path / "tall.png"
    Image.effect_noise((40, 120), 60).convert("RGB").save(second)
    stdout = io.StringIO()
    assert cli.main(["--model-path", anyres_dir, "--image-file", image_file, str(second), *GREEDY,
                     "--query", "Do the two images show the same colour?"], stdout=stdout) == 0
    loaded = load_pretrained_model(anyres_dir, device="cpu")
    images = [Image.open(image_file).convert("RGB"), Image.open(second).convert("RGB")]
    prompt = build_prompt(loaded, "<image>\n<image>\nDo the two images show the same colour?", images)
    expected = generate_batch(loaded, [prompt], GenerationSettings(max_new_tokens=10))[0]
    assert stdout.getvalue().strip() == expected.strip()
