"""Missing and corrupt images: found before training starts, or, when an image only fails to decode
mid-run, named (and with --skip_bad_samples skipped, counted and recorded)."""
import json

import pytest

from faultlib import (color_samples, one_thread, train_argv, train_in_process, trainer_state,
                      write_png_that_fails_full_decode, write_samples, write_truncated_jpeg)
from llava_tiny.checks import inspect_image
from llava_tiny.train.dataset import BadSamplesError, ImageDecodeError
from llava_tiny.train.trainer import LlavaTrainer

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

QUESTION = [{"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def data_with_bad_images(tmp_path):
    samples = color_samples(tmp_path, 8)
    write_truncated_jpeg(tmp_path / "images" / "cut.jpg")
    samples.insert(3, {"id": "truncated-jpeg", "image": "images/cut.jpg", "conversations": QUESTION})
    samples.insert(6, {"id": "missing-file", "image": "images/nowhere.png", "conversations": QUESTION})
    return write_samples(tmp_path, samples)


def test_missing_and_truncated_images_stop_the_run_before_training(tmp_path, tiny_parts, data_with_bad_images,
                                                                  monkeypatch):
    trained = []
    monkeypatch.setattr(LlavaTrainer, "train", lambda self, **kwargs: trained.append(True))
    with pytest.raises(BadSamplesError) as err:
        train_in_process(train_argv(tiny_parts, data_with_bad_images, tmp_path / "out", "--max_steps", "1"))
    message = str(err.value)
    assert "2 of 10 samples cannot be used" in message
    assert "truncated-jpeg: image 'images/cut.jpg' corrupt" in message and "truncated" in message
    assert "missing-file: image 'images/nowhere.png' missing" in message
    assert "--skip_bad_samples" in message
    assert not trained


def test_skip_bad_samples_trains_without_them_and_lists_them(tmp_path, tiny_parts, data_with_bad_images, capfd):
    out = tmp_path / "out"
    with pytest.raises(BadSamplesError, match=r"more than 1.0% of the data is bad"):  # the default bound
        train_in_process(train_argv(tiny_parts, data_with_bad_images, out, "--max_steps", "4",
                                    "--skip_bad_samples", "True"))
    train_in_process(train_argv(tiny_parts, data_with_bad_images, out, "--max_steps", "4",
                                "--skip_bad_samples", "True", "--max_bad_sample_fraction", "0.5"))
    skipped = json.load(open(out / "skipped_samples.json"))
    assert sorted(skipped) == ["missing-file", "truncated-jpeg"]
    assert "2 of 10 samples cannot be used" in capfd.readouterr().err
    assert trainer_state(out)["global_step"] == 4  # 8 good samples, batch 2: all of them, nothing else


@pytest.fixture
def data_with_undecodable_image(tmp_path):
    samples = color_samples(tmp_path, 7)
    write_png_that_fails_full_decode(tmp_path / "images" / "garbled.png")
    samples.insert(2, {"id": "garbled-png", "image": "images/garbled.png", "conversations": QUESTION})
    data = write_samples(tmp_path, samples)
    # The fault this file injects: it passes the pre-training check, so it can only fail mid-run.
    assert inspect_image(str(tmp_path / "images" / "garbled.png"), full=False).problem is None
    return data


def test_image_that_fails_to_decode_mid_run_stops_it_naming_sample_and_path(tmp_path, tiny_parts,
                                                                            data_with_undecodable_image):
    argv = train_argv(tiny_parts, data_with_undecodable_image, tmp_path / "out", "--max_steps", "4",
                      "--train_sampling_strategy", "sequential")
    with pytest.raises(ImageDecodeError, match=r"sample 'garbled-png': cannot decode image \S*images/garbled.png"):
        train_in_process(argv)


def test_skip_bad_samples_skips_counts_and_records_a_mid_run_decode_error(tmp_path, tiny_parts,
                                                                         data_with_undecodable_image, capfd):
    out = tmp_path / "out"
    # A dataloader worker (another process) meets the bad image: the record still reaches the output dir.
    train_in_process(train_argv(tiny_parts, data_with_undecodable_image, out, "--max_steps", "4",
                                "--train_sampling_strategy", "sequential", "--dataloader_num_workers", "1",
                                "--skip_bad_samples", "True", "--max_bad_sample_fraction", "0.2"))
    skipped = json.load(open(out / "skipped_samples.json"))
    assert list(skipped) == ["garbled-png"]
    assert "cannot decode image" in skipped["garbled-png"] and "garbled.png" in skipped["garbled-png"]
    err = capfd.readouterr().err
    assert "1 sample(s) skipped so far" in err
    assert trainer_state(out)["global_step"] == 4
