"""data_tools.stats: per split and per source counts, length summaries, table, PNG and JSON report."""
import json

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
