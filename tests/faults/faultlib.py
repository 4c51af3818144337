"""Helpers for the fault tests: real training runs (in this process or as a subprocess that can be
signalled), bad files crafted byte by byte, and small LLaVA data sets.

(A module rather than tests/faults/conftest.py: a second `conftest` module would shadow the
`from conftest import write_color_dataset` that tests in tests/ rely on.)
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention (a 64x1000
    matmul takes ~0.1 ms on one thread, over 10 ms on two when the other core is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_argv(tiny_parts, data, out, *flags) -> list[str]:
    """LLaVA-style flags for a tiny full fine-tuning run; later flags override earlier ones."""
    return ["--model_name_or_path", tiny_parts["llm"], "--vision_tower", tiny_parts["clip"],
            "--data_path", data["data_path"], "--image_folder", data["image_folder"], "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_strategy", "no",
            "--learning_rate", "1e-3", "--report_to", "none", "--seed", "0", *map(str, flags)]


def train_in_process(argv: list[str]) -> None:
    from llava_tiny.train import train as train_module

    train_module.train(argv=argv)


def trainer_state(folder) -> dict:
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return json.load(f)


# --- training as a separate process that a test can signal -----------------------------------------
def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # see one_thread
    env.update(extra)
    return env


# Run by `start_training(..., pause_in_save_at=N)`: the save of checkpoint-N sleeps after its weights are
# written and before the optimizer state and trainer_state.json, so a kill lands mid-write.
PAUSING_SAVE = """
import sys, time
from transformers import Trainer
from llava_tiny.train.train import train

step, argv = int(sys.argv[1]), sys.argv[2:]
write_optimizer = Trainer._save_optimizer_and_scheduler

def pausing(self, output_dir):
    if self.state.global_step == step:
        print(f"pausing inside the save of checkpoint-{step}", flush=True)
        time.sleep(120)
    return write_optimizer(self, output_dir)

Trainer._save_optimizer_and_scheduler = pausing
train(argv=argv)
"""


def start_training(argv: list[str], log_path, pause_in_save_at: int | None = None, **env) -> subprocess.Popen:
    """`python -m llava_tiny.train.train ARGV` with stdout+stderr going to `log_path`, in a process group
    of its own (its dataloader workers too), as a scheduler sees a job."""
    log = open(log_path, "w")
    command = ["-m", "llava_tiny.train.train"] if pause_in_save_at is None else ["-c", PAUSING_SAVE, str(pause_in_save_at)]
    return subprocess.Popen([sys.executable, *command, *argv], cwd=REPO,
                            env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_training(argv: list[str], log_path, timeout=300, **env) -> tuple[int, str]:
    proc = start_training(argv, log_path, **env)
    proc.wait(timeout=timeout)
    return proc.returncode, read(log_path)


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def wait_for(predicate, proc: subprocess.Popen, log_path, timeout=240.0) -> None:
    """Poll until `predicate()`; fail with the run's log if it exits or time runs out first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before the fault could be injected:\n"
                                 f"{read(log_path)[-3000:]}")
        if time.time() > deadline:
            proc.send_signal(signal.SIGKILL)
            raise AssertionError(f"timed out waiting for the run:\n{read(log_path)[-3000:]}")
        time.sleep(0.05)


# --- data ----------------------------------------------------------------------------------------
def write_samples(root, samples: list[dict], name="data.json") -> dict:
    path = os.path.join(str(root), name)
    with open(path, "w") as f:
        json.dump(samples, f)
    return {"data_path": path, "image_folder": str(root)}


def color_samples(root, n: int, first=0, size=40) -> list[dict]:
    """`n` image samples "img-<i>" whose picture is a solid colour saved as PNG under root/images/."""
    colors = [("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220)), ("yellow", (230, 230, 20))]
    os.makedirs(os.path.join(str(root), "images"), exist_ok=True)
    samples = []
    for i in range(first, first + n):
        name, rgb = colors[i % len(colors)]
        Image.new("RGB", (size, size), rgb).save(os.path.join(str(root), "images", f"{i}.png"))
        samples.append({"id": f"img-{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": name}]})
    return samples


def text_samples(n: int) -> list[dict]:
    return [{"id": f"txt-{i}", "conversations": [{"from": "human", "value": f"Say the number {i}."},
                                                  {"from": "gpt", "value": str(i)}]} for i in range(n)]


# --- bad files -------------------------------------------------------------------------------------
def _noisy_image(size=48) -> Image.Image:
    img = Image.new("RGB", (size, size))
    img.putdata([((x * 37) % 256, (y * 53) % 256, (x * y) % 256) for y in range(size) for x in range(size)])
    return img


def write_truncated_jpeg(path) -> None:
    """A JPEG cut in half, as an interrupted download leaves it: the header is intact."""
    _noisy_image().save(path, format="JPEG", quality=95)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def write_png_that_fails_full_decode(path) -> None:
    """A PNG whose compressed pixel data is garbled but whose chunk CRCs are recomputed: it passes
    `Image.verify()` (header and CRC checks) and fails only when the pixels are decoded."""
    _noisy_image().save(path, format="PNG")
    with open(path, "rb") as f:
        data = f.read()
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind, body = data[pos + 4:pos + 8], bytearray(data[pos + 8:pos + 8 + length])
        if kind == b"IDAT":
            for i in range(len(body) // 2, min(len(body), len(body) // 2 + 16)):
                body[i] ^= 0xFF
        out += struct.pack(">I", length) + kind + body + struct.pack(">I", zlib.crc32(kind + bytes(body)) & 0xFFFFFFFF)
        pos += 12 + length
    with open(path, "wb") as f:
        f.write(bytes(out))
