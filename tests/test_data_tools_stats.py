"""data_tools.stats: per split and per source counts, length summaries, table, PNG and JSON report."""
import json

import pytest

from data_tools import stats
from data_tools.testing import conversation
from llava_tiny.testing.tiny import LLAMA2_TOKENIZER


def _samples(n, source, answer, qtype):
    return [{"id": f"{source}-{i}", "image": f"{source}/{i % 2}.png", "source": source, "question_type": qtype,
             "answer_type": "open", "conversations": conversation("Describe.", answer)} for i in range(n)]


def test_stats_per_split_and_source(tmp_path, capsys):
    train = _samples(4, "RSICD", "a wide river", "caption") + _samples(2, "DOTA", "two", "count")
    train.append({"id": "text", "conversations": conversation("Hi?", "hello there", image=False)})
    test = _samples(3, "RSICD", "a bridge", "caption")
    paths = []
    for name, samples in (("data_train", train), ("data_test", test)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(samples))
        paths.append(str(path))
    out_dir, report = tmp_path / "stats", tmp_path / "stats.json"
    assert stats.main(["--data", *paths, "--out-dir", str(out_dir), "--report", str(report),
                       "--tokenizer", LLAMA2_TOKENIZER, "--num-image-tokens", "4"]) == 0
    table = capsys.readouterr().out
    assert "| train | (all) | 7 | 4 | 1 | 1.0 |" in table
    assert "| train | DOTA | 2 | 2 | 0 |" in table
    assert "| test | (all) | 3 | 2 | 0 |" in table and "| test | RSICD" not in table  # one source: no repeat
    assert (out_dir / "stats.md").read_text() in table
    assert (out_dir / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.load(open(report))["stats"]
    train_all = data["train"]["(all)"]
    assert train_all["answer_words"]["max"] == 3 and train_all["answer_words_histogram"] == {"1": 2, "2": 1, "3": 4}
    assert train_all["question_types"] == {"caption": 4, "count": 2, "(none)": 1}
    assert data["train"]["(unknown)"]["samples"] == 1  # the text-only sample has no source
    tokens = train_all["tokens"]
    assert tokens["count"] == 7 and tokens["min"] < tokens["max"]
    assert data["train"]["DOTA"]["tokens"]["max"] <= tokens["max"]


def test_stats_never_writes_over_an_input(tmp_path, capsys):
    path = tmp_path / "stats.md"
    path.write_text(json.dumps(_samples(2, "UCM", "a farm", "caption")))
    before = path.read_bytes()
    assert stats.main(["--data", str(path), "--out-dir", str(tmp_path)]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_answer_distribution_and_image_modes(tmp_path, capsys):
    from PIL import Image

    Image.new("RGBA", (8, 6)).save(tmp_path / "a.png")
    Image.new("L", (8, 6)).save(tmp_path / "b.png")
    samples = [{"id": str(i), "image": "a.png" if i % 2 else "b.png", "question_type": "garment",
                "conversations": conversation("What is it?", answer)}
               for i, answer in enumerate(["Coat", "coat", "dress", "coat"])]
    path = tmp_path / "data_train.json"
    path.write_text(json.dumps(samples))
    report = tmp_path / "stats.json"
    assert stats.main(["--data", str(path), "--image-folder", str(tmp_path), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "train garment: 2 distinct answers, majority share 0.75 (top: coat 3, dress 1)" in out
    assert "train images: 2 (RGBA 1, L 1; sizes 8x6; 0 unreadable)" in out
    row = json.load(open(report))["stats"]["train"]["(all)"]
    assert row["answers"]["garment"]["top"] == [["coat", 3], ["dress", 1]]
    assert row["image_files"]["modes"] == {"RGBA": 1, "L": 1}


def test_one_word_answers_get_a_top_answers_chart():
    """Peer: the answer counts by hand (train: coat 3 of 4, dress 1; test: dress 1 of 1); longer answers get none."""
    from collections import Counter

    answers = {"train": Counter({"coat": 3, "dress": 1}), "test": Counter({"dress": 1})}
    figure = stats.stats_figure({"train": [1, 1, 1, 1], "test": [1]}, None, answers)
    top = figure.axes[-1]
    assert top.get_title() == "top 2 answers" and [t.get_text() for t in top.get_yticklabels()] == ["coat", "dress"]
    widths = [bar.get_width() for container in top.containers for bar in container]
    assert widths == [0.75, 0.25, 0.0, 1.0]  # train: coat, dress; test: coat, dress
    captions = stats.stats_figure({"train": [5, 7, 1]}, None, {"train": Counter({"a red bus": 1})})
    assert [axis.get_title() for axis in captions.axes] == ["answer length (words)"]


def test_image_sizes_and_tokens_under_pad_and_anyres(tmp_path, capsys):
    """Peer: anyres counts by hand for a 32 px tower, patch 8, grids 1x1..3x3 (4x4 patches per tile):
    32x32 -> 1x1 tile: 4*4 + 4 newlines + 16 overview = 36; 64x64 -> 2x2 tiles: 8*8 + 8 + 16 = 88;
    100x20 -> 1x3 tiles (32x96 keeps the most pixels), 4x12 patches, unpadded to 2 rows: 2*12 + 2 + 16 = 42."""
    from PIL import Image

    for name, size in (("square.png", (32, 32)), ("big.png", (64, 64)), ("strip.png", (100, 20))):
        Image.new("RGB", size).save(tmp_path / name)
    samples = [{"id": name, "image": name, "conversations": conversation("What is it?", "a shape")}
               for name in ("square.png", "big.png", "strip.png", "strip.png")]
    path = tmp_path / "data_train.json"
    path.write_text(json.dumps(samples))
    report = tmp_path / "stats.json"
    args = ["--data", str(path), "--image-folder", str(tmp_path), "--report", str(report), "--tower-size", "32",
            "--patch-size", "8", "--tokenizer", LLAMA2_TOKENIZER, "--num-image-tokens", "16"]
    assert stats.main([*args, "--image_grid_pinpoints", "(1x1),...,(3x3)"]) == 0
    out = capsys.readouterr().out
    assert "train image sizes: width median 64 / p95 100 / max 100, height median 32 / p95 64 / max 64" in out
    assert "train image tokens: pad 16 each (tower 32 px, patch 8); anyres median 42 / p95 88 / max 88" in out
    row = json.load(open(report))["stats"]["train"]["(all)"]
    files = row["image_files"]
    assert files["aspect_ratios"] == {"4:5-5:4": 2, ">4:1": 1}
    assert files["image_tokens"]["anyres"]["min"] == 36 and files["image_tokens"]["anyres"]["count"] == 3
    assert files["image_tokens"]["anyres_grids"] == {"1x1": 1, "2x2": 1, "1x3": 1}
    assert files["image_tokens"]["pinpoints"][-1] == [96, 96]
    # The same text tokens, each image's 16 placeholders replaced by its anyres count.
    assert row["tokens_anyres"]["max"] == row["tokens"]["max"] - 16 + 88
    assert row["tokens_anyres"]["min"] == row["tokens"]["min"] - 16 + 36
    assert "train tokens per sample under anyres: median" in out

    assert stats.main(args) == 0  # no pinpoints: pad only
    assert "anyres" not in capsys.readouterr().out
    assert "anyres" not in json.load(open(report))["stats"]["train"]["(all)"]["image_files"]["image_tokens"]


def test_unusable_pinpoints_end_stats_with_a_usage_error(tmp_path, capsys):
    path = tmp_path / "data_train.json"
    path.write_text(json.dumps(_samples(1, "UCM", "a farm", "caption")))
    for flags, expected in ((["--patch-size", "8", "--image-grid-pinpoints", "[[32,48]]"],
                             "pinpoint [32, 48] is not a [height, width] pair of positive multiples of the tower's "
                             "image size 32"),
                            (["--patch-size", "14"], "--tower-size 32 --patch-size 14: expected positive sizes")):
        with pytest.raises(SystemExit) as exit_info:
            stats.main(["--data", str(path), "--tower-size", "32", *flags])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
