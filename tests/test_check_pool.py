"""The check before training in chunks and worker processes (`llava_tiny.train.check_pool`): the same samples
named unusable (in the file's order), the same ids, lengths and repeat warnings, whatever the chunk size and
the number of workers; and the byte-range scan (`record_store.iter_ranges`) gives the ranges the decoding
reader gives, on files made to trip it (brackets and quotes inside strings, escapes, Unicode, deep nesting,
indentation), and a broken file gives the reader's error."""
import json
import os

import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from llava_tiny.conversation import prepare_tokenizer
from llava_tiny.data import DataFileError
from llava_tiny.train import check_pool
from llava_tiny.train.dataset import LazySupervisedDataset
from llava_tiny.train.record_store import iter_ranges, iter_records

GOOD = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]


def _write(root, n=40) -> str:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    Image.new("RGB", (20, 30), (200, 0, 0)).save(os.path.join(root, "images", "red.png"))
    too_long = [GOOD[0], {"from": "gpt", "value": " ".join(["red green blue"] * 60)}]  # cannot fit 96 tokens
    unmarked = [{"from": "human", "value": 'What color? } ] {"x": ['}, GOOD[1]]  # an image without its marker
    samples = []
    for i in range(n):
        turns = too_long if i % 5 == 4 else unmarked if i % 9 == 8 else [GOOD[0], {**GOOD[1], "value": f"red {i}"}]
        sample = {"id": f"s{i}", "image": "images/missing.png" if i % 7 == 3 else "images/red.png",
                  "conversations": turns}
        if i % 6 == 1:
            del sample["id"]  # named by its index in the whole file, whichever chunk holds it
        samples.append(dict(samples[-2]) if i % 11 == 10 else sample)  # a repeated record
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f, indent=1)
    return path


def _summary(tiny_parts, root, data_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts["llm"])
    prepare_tokenizer(tokenizer, "v1")
    dataset = LazySupervisedDataset(data_path, tokenizer, AutoImageProcessor.from_pretrained(tiny_parts["clip"]), "v1",
                                    4, image_folder=root, model_max_length=96, skip_bad_samples=True,
                                    max_bad_sample_fraction=1.0, data_cache_dir="none")
    return {"skipped": list(dataset.skipped.items()), "ids": dataset.ids, "lengths": dataset.modality_lengths,
            "ranges": [(dataset.samples.starts[i], dataset.samples.ends[i]) for i in range(len(dataset))],
            "items": [dataset[i]["input_ids"].tolist() for i in (0, len(dataset) - 1)]}


@pytest.mark.parametrize("chunk,workers", [(7, "1"), (7, "2"), (1, "2")])
def test_chunks_and_workers_name_the_same_samples(tmp_path, tiny_parts, monkeypatch, caplog, chunk, workers):
    root = str(tmp_path)
    data_path = _write(root)
    alone = _summary(tiny_parts, root, data_path)  # one chunk, in this process
    why = dict(alone["skipped"])
    assert "missing" in why["s3"] and "model_max_length" in why["s4"] and "#19" in why and "s8" in why
    monkeypatch.setattr(check_pool, "CHUNK", chunk)
    monkeypatch.setenv("LLAVA_TINY_CHECK_WORKERS", workers)
    caplog.clear()
    assert _summary(tiny_parts, root, data_path) == alone
    assert "duplicate_sample" in caplog.text


TRICKY = [{"id": "a", "conversations": [{"from": "human", "value": "} ] { [ \" \\\" \\\\"}]},
          {"id": "ü", "x": "图中有什么 🙂 \u2028", "deep": [[[[[[[[{"a": [1, {"b": "}"}]}]]]]]]]]},
          {"id": "c", "n": [1, 2.5e3, True, None, {}, []]}, {}]


@pytest.mark.parametrize("indent", [None, 2])
def test_the_scan_finds_the_ranges_the_reader_finds(tmp_path, indent):
    path = str(tmp_path / "data.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(TRICKY * 3, f, indent=indent, ensure_ascii=False)
    assert list(iter_ranges(path)) == [(start, end) for start, end, _ in iter_records(path)]
    jsonl = str(tmp_path / "data.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TRICKY))
    assert list(iter_ranges(jsonl)) == [(start, end) for start, end, _ in iter_records(jsonl)]
    empty = str(tmp_path / "empty.json")
    with open(empty, "w") as f:
        f.write(" [ ] ")
    assert list(iter_ranges(empty)) == []


def test_a_broken_file_gives_the_readers_error(tmp_path):
    """The scan only finds ranges; decoding them (in the check) raises what the reader raises."""
    from array import array

    path = str(tmp_path / "data.json")
    with open(path, "w") as f:
        f.write('[{"id": "a"}, {"id": "b",, }, {"id": "c"}]')
    ranges = list(iter_ranges(path))
    with pytest.raises(DataFileError) as checked:
        check_pool.check_chunk(None, path, 0, array("q", [s for s, _ in ranges]), array("q", [e for _, e in ranges]),
                               0, 1, {})
    with pytest.raises(DataFileError) as read:
        list(iter_records(path))
    assert str(checked.value) == str(read.value) and "line 1" in str(read.value)
