"""Quiet, honest logs: the two dependency warnings are filtered once the project is imported (and only
those), and the first DeepSpeed CPU run says it is compiling."""
import json
import logging
import os
import subprocess
import sys

import pytest

from llava_tiny._quiet import FILTERED, SHM_OP, announce_deepspeed_cpu_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHVISION = "requires torchvision (not installed); falling back to"
KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _stderr_of(code: str, folder) -> str:
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          check=True, env=dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1"))
    return done.stderr


def test_loading_an_image_processor_and_bitsandbytes_prints_neither_warning(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 32, "width": 32},
        "size": {"shortest_edge": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    # transformers warns when the torchvision-backed name is used (llava_tiny.testing.tiny, users' scripts)
    load = ("import sys, bitsandbytes; from transformers import CLIPImageProcessor; "
            "print(type(CLIPImageProcessor.from_pretrained(sys.argv[1])).__name__, file=sys.stderr)")
    plain = _stderr_of(load, tmp_path)  # the same without the project: the warnings are real
    if TORCHVISION not in plain:
        pytest.skip("transformers did not warn about torchvision here (torchvision installed?)")
    ours = _stderr_of("import llava_tiny; " + load, tmp_path)
    assert "CLIPImageProcessorPil" in ours  # the PIL processor is still the one used
    assert TORCHVISION not in ours and KERNELS not in ours, ours


def test_only_the_two_messages_are_filtered(caplog):
    for name, text in FILTERED.items():
        logger = logging.getLogger(name)
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning("%s: something", text)
            logger.warning("another warning from %s", name)
        messages = [r.getMessage() for r in caplog.records if r.name == name]
        assert messages == [f"another warning from {name}"]
        caplog.clear()


def test_the_first_deepspeed_cpu_run_is_announced_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    announce_deepspeed_cpu_build()
    assert "building DeepSpeed's CPU communication op once, 1-2 min" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")  # other ranks wait on the same build: one line is enough
    announce_deepspeed_cpu_build()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    (tmp_path / SHM_OP / f"{SHM_OP}.so").write_bytes(b"built")  # the cache holds it: nothing to say
    announce_deepspeed_cpu_build()
    assert capsys.readouterr().err == ""
