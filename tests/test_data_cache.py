"""The check before training, cached (`llava_tiny.train.check_cache`): a warm start reads it, and a change
to anything it depends on (the data file, the tokenizer, the template, the image token count,
model_max_length, an image) checks again; bad samples are named either way. Records read from the file
by byte range (`record_store`) are the records `load_samples` reads."""
import json
import os
import pickle

import pytest
from transformers import AutoImageProcessor, AutoTokenizer

from conftest import write_color_dataset
from llava_tiny.conversation import prepare_tokenizer
from llava_tiny.data import load_samples
from llava_tiny.train import dataset as dataset_module
from llava_tiny.train.dataset import BadSamplesError, LazySupervisedDataset
from test_train import losses, run


@pytest.fixture()
def counted(monkeypatch):
    """How many records the check looked at (0 on a warm start)."""
    seen = []
    check_samples = dataset_module.check_samples
    monkeypatch.setattr(dataset_module, "check_samples",
                        lambda samples, **kwargs: seen.extend(samples) or check_samples(samples, **kwargs))
    return seen


def _tokenizer(tiny_parts, extra_token=None):
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts["llm"])
    prepare_tokenizer(tokenizer, "v1")
    if extra_token:
        tokenizer.add_tokens([extra_token])
    return tokenizer


def _build(tiny_parts, root, data_path, tokenizer=None, template="v1", image_tokens=4, max_length=96, **kwargs):
    return LazySupervisedDataset(data_path, tokenizer or _tokenizer(tiny_parts),
                                 AutoImageProcessor.from_pretrained(tiny_parts["clip"]), template, image_tokens,
                                 image_folder=root, model_max_length=max_length, **kwargs)


def _summary(dataset):
    return {"ids": dataset.ids, "lengths": dataset.modality_lengths, "skipped": dataset.skipped,
            "items": [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]}


CHANGES = {
    "tokenizer": {"tokenizer": "extra"},
    "template": {"template": "llava_v1"},
    "image token count": {"image_tokens": 9},
    "model_max_length": {"max_length": 80},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_setting_checks_again(tmp_path, tiny_parts, counted, change):
    root = str(tmp_path)
    data_path = write_color_dataset(root, n=6, text_only=2)
    cold = _summary(_build(tiny_parts, root, data_path))
    assert len(counted) == 8 and os.listdir(os.path.join(root, ".llava_tiny_cache"))
    warm = _summary(_build(tiny_parts, root, data_path))
    assert len(counted) == 8 and warm == cold  # nothing changed: nothing checked, the same dataset
    settings = dict(CHANGES[change])
    if "tokenizer" in settings:
        settings["tokenizer"] = _tokenizer(tiny_parts, extra_token="zebra-crossing")
    _build(tiny_parts, root, data_path, **settings)
    assert len(counted) == 16


def test_a_changed_data_file_or_deleted_image_checks_again(tmp_path, tiny_parts, counted):
    root = str(tmp_path)
    data_path = write_color_dataset(root, n=6)
    _build(tiny_parts, root, data_path)
    samples = json.load(open(data_path))
    samples[2]["conversations"][1]["value"] = "purple"  # the same size, another content
    with open(data_path, "w") as f:
        json.dump(samples, f)
    assert _build(tiny_parts, root, data_path)[2]["labels"].tolist() != [] and len(counted) == 12
    os.remove(os.path.join(root, "images", "3.png"))
    with pytest.raises(BadSamplesError, match=r"data.json: 1 of 6 samples cannot be used:\n  img-3: image "
                                              r"'images/3.png' missing"):
        _build(tiny_parts, root, data_path)
    assert len(counted) == 18
    # The warm start names the bad sample too, and --skip_bad_samples keeps its meaning.
    with pytest.raises(BadSamplesError, match="img-3"):
        _build(tiny_parts, root, data_path)
    assert len(counted) == 18
    kept = _build(tiny_parts, root, data_path, skip_bad_samples=True, max_bad_sample_fraction=0.5)
    assert "img-3" not in kept.ids and list(kept.skipped) == ["img-3"] and len(counted) == 18


def test_records_read_by_byte_range_equal_the_loaded_ones(tmp_path, tiny_parts):
    root = str(tmp_path)
    data_path = os.path.join(root, "data.jsonl")
    samples = load_samples(write_color_dataset(root, n=5))
    samples[1]["conversations"][1]["value"] = "rouge é 红 \U0001F600"  # multi-byte text shifts every range
    with open(data_path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(s, ensure_ascii=False) for s in samples) + "\n")
    for path in data_path, write_color_dataset(os.path.join(root, "list"), n=5):
        dataset = _build(tiny_parts, os.path.dirname(path), path, data_cache_dir="none")
        assert list(dataset.samples) == load_samples(path)
        assert list(pickle.loads(pickle.dumps(dataset.samples))) == load_samples(path)  # dataloader workers
    assert not os.path.exists(os.path.join(root, ".llava_tiny_cache"))  # "none": nothing written


def test_the_same_run_gives_the_same_losses_with_and_without_the_cache(tmp_path, tiny_parts):
    root = str(tmp_path)
    data = {"data_path": write_color_dataset(root, n=8), "image_folder": root}
    flags = ("--num_train_epochs", "1", "--group_by_modality_length", "True", "--data_cache_dir")
    off = losses(run(tiny_parts, data, tmp_path / "off", *flags, "none"))
    cold = losses(run(tiny_parts, data, tmp_path / "cold", *flags, tmp_path / "cache"))
    warm = losses(run(tiny_parts, data, tmp_path / "warm", *flags, tmp_path / "cache"))
    assert len(off) == 2 and off == cold == warm
    assert os.listdir(tmp_path / "cache")
