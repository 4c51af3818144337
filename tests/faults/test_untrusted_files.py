"""Untrusted files: pickles never run code, remote code never runs unless asked for, image paths
stay inside --image_folder unless allowed. (scripts/convert_bin_to_safetensors.py refusing a
malicious pickle: tests/test_merge_export.py::test_convert_refuses_a_pickle_that_runs_code.)"""
import ast
import inspect
import os
import pickle
import shutil

import pytest
import torch

from conftest import required_flags
from faultlib import REPO, color_samples, one_thread, train_argv, train_in_process, write_samples
from llava_tiny.model import builder, checkpoints, vision
from llava_tiny.train import starting_point
from llava_tiny.train.arguments import parse_args
from llava_tiny.train.dataset import BadSamplesError, LazySupervisedDataset

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): what a malicious checkpoint does, harmlessly."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_malicious_pickle(path, target) -> None:
    torch.save({"state": {}, "param_groups": [], "x": _CreatesAFile(str(target))}, path)
    torch.load(path, weights_only=False)  # an unsafe load runs the payload: the file is a real attack
    assert os.path.exists(target)
    os.remove(target)


def _python_files():
    for root, dirs, files in os.walk(REPO):
        skipped = ("build", "dist", "data", "runs", "__pycache__")  # not source, or too big to walk
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skipped and not d.endswith(".egg-info")]
        yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


def test_every_torch_load_in_the_repo_is_weights_only():
    calls = []
    for path in _python_files():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flags = {k.arg: k.value for k in node.keywords}
                safe = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
                calls.append((os.path.relpath(path, REPO), node.lineno, safe))
    this_file = os.path.relpath(__file__, REPO)
    unsafe = [(p, line) for p, line, safe in calls if not safe and p != this_file]  # the attack demo above
    assert calls and not unsafe, f"torch.load without weights_only=True: {unsafe}"


@pytest.fixture(scope="module")
def finished_step_1(tmp_path_factory, tiny_parts):
    root = tmp_path_factory.mktemp("resume_src")
    data = write_samples(root, color_samples(root, 4))
    train_in_process(train_argv(tiny_parts, data, root / "run", "--max_steps", "1", "--save_strategy", "steps",
                                "--save_steps", "1"))
    return data, root / "run" / "checkpoint-1"


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resuming_from_a_checkpoint_with_a_malicious_pickle_refuses_it(tmp_path, tiny_parts, finished_step_1, name):
    data, checkpoint = finished_step_1
    poisoned = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, poisoned)
    target = tmp_path / "created-by-the-pickle"
    _write_malicious_pickle(poisoned / name, target)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_in_process(train_argv(tiny_parts, data, tmp_path / "out", "--max_steps", "2",
                                    "--resume_from_checkpoint", poisoned))
    assert not target.exists()


def test_a_pickled_stage1_projector_is_refused_without_unpickling_it(tmp_path, tiny_parts):
    target = tmp_path / "created-by-the-pickle"
    _write_malicious_pickle(tmp_path / "mm_projector.bin", target)
    data = write_samples(tmp_path, color_samples(tmp_path, 2))
    with pytest.raises(ValueError, match="pickled weights are never loaded.*convert_bin_to_safetensors.py"):
        train_in_process(train_argv(tiny_parts, data, tmp_path / "out", "--pretrain_mm_mlp_adapter",
                                    tmp_path / "mm_projector.bin"))
    with pytest.raises(Exception, match="deserializing header"):  # the loader itself reads safetensors only
        checkpoints.load_projector_weights(builder.assemble_model(tiny_parts["llm"], tiny_parts["clip"]).model,
                                       str(tmp_path / "mm_projector.bin"))
    assert not target.exists()


def test_trust_remote_code_is_off_unless_passed(tmp_path, tiny_parts, monkeypatch):
    model_args, _, _ = parse_args(required_flags(tmp_path))
    assert model_args.trust_remote_code is False
    for function in (builder.assemble_model, builder.load_pretrained_model, vision.load_vision_tower):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    seen = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "not passed"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    builder.assemble_model(tiny_parts["llm"], tiny_parts["clip"])
    assert len(seen) >= 3 and set(seen) == {False}, seen

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise Stop

    seen.clear()
    monkeypatch.setattr(starting_point, "assemble_model", stop)  # where train() assembles the model
    data = write_samples(tmp_path, color_samples(tmp_path, 2))
    with pytest.raises(Stop):
        train_in_process(train_argv(tiny_parts, data, tmp_path / "out"))
    assert seen[-1] is False and set(seen) == {False}  # the flag check reads the tower's config first
    seen.clear()
    with pytest.raises(Stop):
        train_in_process(train_argv(tiny_parts, data, tmp_path / "out2", "--trust_remote_code", "True"))
    assert seen[-1] is True and set(seen) == {True}


def test_image_paths_escaping_the_image_folder_are_refused_unless_allowed(tmp_path, tiny_parts):
    folder = tmp_path / "data"
    samples = color_samples(folder, 2)
    outside = color_samples(tmp_path / "elsewhere", 1)[0]
    outside_path = tmp_path / "elsewhere" / outside["image"]
    os.symlink(outside_path, folder / "images" / "link.png")
    question = samples[0]["conversations"]
    samples += [{"id": "dotdot", "image": "../elsewhere/images/0.png", "conversations": question},
                {"id": "absolute", "image": str(outside_path), "conversations": question},
                {"id": "symlink", "image": "images/link.png", "conversations": question}]
    data = write_samples(folder, samples)
    loaded = builder.assemble_model(tiny_parts["llm"], tiny_parts["clip"])

    def dataset(**kwargs):
        return LazySupervisedDataset(data["data_path"], loaded.tokenizer, loaded.image_processor, loaded.template,
                                     loaded.model.config.image_seq_length, image_folder=data["image_folder"], **kwargs)

    with pytest.raises(BadSamplesError) as err:
        dataset()
    for sid, rel in (("dotdot", "../elsewhere/images/0.png"), ("absolute", str(outside_path)),
                     ("symlink", "images/link.png")):
        assert f"{sid}: image path {rel!r} escapes the image folder" in str(err.value)
    assert "--allow_images_outside_folder" in str(err.value)
    allowed = dataset(allow_images_outside_folder=True)
    assert len(allowed) == 5 and all(allowed[i]["pixel_values"].shape[0] == 1 for i in range(5))
