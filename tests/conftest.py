import os
import sys

# No test touches a model hub or the network; keep runs quiet and single-threaded per process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
if "PYTEST_XDIST_WORKER" in os.environ:  # one worker per core (scripts/test.sh): a second thread only contends
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every subprocess finds this environment's `deepspeed` launcher and `ninja`, and DeepSpeed's CPU op is built once
# per checkout: two ninja binaries (the venv's and /usr/bin's) alternating over one build folder rebuilt the op
# (~45 s) at each switch, four times in one CI run, and pushed gpu_suite's ZeRO-2 smoke run past its budget.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), ".torch_extensions"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Tiny LLM (small tokenizer), CLIP and SigLIP written to disk once per session."""
    from llava_tiny.testing.tiny import make_tiny_parts

    return make_tiny_parts(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def llama2_llm(tmp_path_factory):
    """A tiny LLM with the exact Llama-2/TinyLlama tokenizer (32k vocabulary)."""
    from llava_tiny.testing.tiny import make_tiny_llm

    return make_tiny_llm(str(tmp_path_factory.mktemp("llama2") / "llm"), tokenizer="llama2", hidden_size=32)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_parts):
    """A saved full checkpoint of a tiny LLaVA (random projector, seed 0), for inference and serving tests."""
    import torch

    from llava_tiny.model.builder import assemble_model

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("models") / "tiny-vlm")
    assemble_model(tiny_parts["llm"], tiny_parts["clip"]).save_pretrained(path)
    return path


ANYRES_PINPOINTS = "(1x1),...,(4x4)"  # tiles of the tiny tower's 56 px: 36 to 288 image tokens
ANYRES_CONTEXT = 256  # the tokenizer's model_max_length in anyres_dir: the largest grids do not fit


@pytest.fixture(scope="session")
def anyres_dir(tmp_path_factory, tiny_parts):
    """A saved anyres (stock llava_next) folder of the tiny LLM and CLIP under ANYRES_PINPOINTS, image_newline
    visibly part of the features, its context ANYRES_CONTEXT tokens (so an image can be too large for it)."""
    import torch

    from llava_tiny.model.anyres_model import with_anyres
    from llava_tiny.model.builder import assemble_model

    torch.manual_seed(0)
    loaded = with_anyres(assemble_model(tiny_parts["llm"], tiny_parts["clip"]), ANYRES_PINPOINTS)
    with torch.no_grad():
        loaded.model.model.image_newline.mul_(10)
    loaded.tokenizer.model_max_length = ANYRES_CONTEXT
    folder = str(tmp_path_factory.mktemp("anyres") / "model")
    loaded.save_pretrained(folder)
    return folder


def write_color_dataset(root, n=16, size=40, text_only=0, seed=0):
    """A small LLaVA JSON set: coloured images with "what color" questions (+ text-only samples)."""
    import json
    import random

    from PIL import Image

    rng = random.Random(seed)
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    samples = []
    for i in range(n):
        name = rng.choice(sorted(colors))
        Image.new("RGB", (size, size + (i % 3) * 8), colors[name]).save(os.path.join(root, "images", f"{i}.png"))
        samples.append({"id": f"img-{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": name}]})
    for i in range(text_only):
        samples.append({"id": f"txt-{i}", "conversations": [
            {"from": "human", "value": f"Say the number {i}."}, {"from": "gpt", "value": str(i)}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def required_flags(tmp_path) -> list[str]:
    """The flags every training run needs, pointing at an (empty) data file and folders that read as a
    language model and a CLIP tower (their files, not their weights): for parse_args tests."""
    import json

    from safetensors.torch import save_file

    data, llm = os.path.join(str(tmp_path), "flags-data.json"), os.path.join(str(tmp_path), "flags-llm")
    with open(data, "w") as f:
        f.write("[]")
    os.makedirs(llm, exist_ok=True)
    with open(os.path.join(llm, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    save_file({}, os.path.join(llm, "model.safetensors"))
    tower = os.path.join(str(tmp_path), "flags-tower")
    os.makedirs(tower, exist_ok=True)
    with open(os.path.join(tower, "config.json"), "w") as f:
        json.dump({"model_type": "clip_vision_model"}, f)
    return ["--model_name_or_path", llm, "--vision_tower", tower, "--data_path", data,
            "--output_dir", os.path.join(str(tmp_path), "out")]


@pytest.fixture(scope="session")
def color_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"data_path": write_color_dataset(str(root), n=16, text_only=4), "image_folder": str(root)}
