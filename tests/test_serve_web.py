"""The Gradio web chat in a real headless Chromium (Debian's `chromium` + `chromium-driver` via selenium):
upload an image, ask, wait for the streamed answer, ask a follow-up, clear; a screenshot is saved.

When no Chromium is installed the browser test is skipped with the reason (scripts/test.sh installs
it with apt where it can); it never passes without running."""
import os
import shutil
import tempfile

import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
openai = pytest.importorskip("openai")

from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch  # noqa: E402
from llava_tiny.model.builder import assemble_model, load_pretrained_model  # noqa: E402
from llava_tiny.serve import web  # noqa: E402
from llava_tiny.serve.launch import ServerProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,1000"]
# Where screenshots go: $LLAVA_TINY_TEST_OUTPUT (CI artifacts) or the test's own tmp folder.
OUTPUT_ENV = "LLAVA_TINY_TEST_OUTPUT"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_parts):
    torch.manual_seed(5)
    path = str(tmp_path_factory.mktemp("web") / "tiny-vlm")
    assemble_model(tiny_parts["llm"], tiny_parts["clip"]).save_pretrained(path)
    os.makedirs(os.path.join(path, "examples"))
    Image.new("RGB", (56, 56), (20, 160, 40)).save(os.path.join(path, "examples", "green.png"))
    with open(os.path.join(path, "examples", "green.txt"), "w") as f:
        f.write("Which colour fills the picture?")
    return path


def test_examples_come_from_the_folder(model_dir):
    examples = web.find_examples(os.path.join(model_dir, "examples"))
    assert examples == [{"text": "Which colour fills the picture?",
                         "files": [os.path.join(model_dir, "examples", "green.png")]}]
    assert web.find_examples(os.path.join(model_dir, "missing")) == []


def test_exposed_web_chat_needs_auth_or_an_explicit_flag(monkeypatch):
    monkeypatch.delenv(web.AUTH_ENV, raising=False)
    with pytest.raises(SystemExit):
        web.parse_args(["--model-path", "m", "--host", "0.0.0.0"])
    assert web.parse_args(["--model-path", "m", "--host", "0.0.0.0", "--auth", "u:p"]).auth == "u:p"
    assert web.parse_args(["--model-path", "m"]).host == "127.0.0.1"


def test_web_chat_flags_are_checked_at_once_before_the_model_loads(capsys):
    with pytest.raises(SystemExit):
        web.parse_args(["--model-path", "m", "--conv-mode", "nope", "--temperature", "-1", "--max-new-tokens", "0",
                        "--auth", "nocolon", "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    for expected in ("--conv-mode: unknown conversation template 'nope'", "--temperature -1.0: expected 0",
                     "--max-new-tokens 0: expected at least 1", "--auth takes user:password"):
        assert expected in err, err


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="no Chromium here: install Debian's chromium and chromium-driver "
                           "(scripts/test.sh does when apt is usable); no browser download exists offline")
def test_web_chat_in_a_real_browser(model_dir, tmp_path):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = str(tmp_path / "red.png")
    red = Image.new("RGB", (70, 56), (200, 30, 30))
    red.save(image_path)
    loaded = load_pretrained_model(model_dir, device="cpu")
    settings = GenerationSettings(max_new_tokens=10)
    first = generate_batch(loaded, [build_prompt(loaded, "<image>\nWhat color is it?", [red])], settings)[0]
    history = [("<image>\nWhat color is it?", first)]
    second = generate_batch(loaded, [build_prompt(loaded, "And the shape?", [red], history)], settings)[0]
    fresh = generate_batch(loaded, [build_prompt(loaded, "What color is it?")], settings)[0]
    assert first and second and fresh not in (first, second)

    args = ["--model-path", model_dir, "--temperature", "0", "--max-new-tokens", "10"]
    with ServerProcess("llava_tiny.serve.web", args, str(tmp_path / "web.log"), ready_path="/",
                       timeout=120) as server:
        driver = _browser()
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(server.url)
            info = wait.until(lambda d: d.find_element(By.ID, "model-info"))
            assert "tiny-vlm" in info.text and "llava_v1" in info.text  # the checkpoint and template shown
            assert "Which colour fills the picture?" in driver.page_source  # the folder's example

            def ask(question, image=None):
                before = len(driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]"))
                if image:
                    driver.find_element(By.CSS_SELECTOR, "#question input[type=file]").send_keys(image)
                    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question img"))
                driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
                driver.find_element(By.CSS_SELECTOR, "#question [data-testid=submit-button]").click()
                # The answer has streamed in when the box takes input again.
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")) > before
                           and d.find_element(By.CSS_SELECTOR, "#question textarea").is_enabled())
                return driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")[-1].text

            assert ask("What color is it?", image_path) == first
            assert ask("And the shape?") == second  # the follow-up kept the conversation
            assert driver.find_elements(By.CSS_SELECTOR, "#chat img")  # the uploaded image is in the chat
            output = os.environ.get(OUTPUT_ENV) or str(tmp_path)
            os.makedirs(output, exist_ok=True)
            shot = os.path.join(output, "web_chat.png")
            assert driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
            print(f"screenshot: {shot}")
            driver.find_element(By.ID, "clear").click()
            wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]"))
            assert ask("What color is it?") == fresh  # after Clear: no image, no history
        finally:
            driver.quit()
        assert server.alive()
