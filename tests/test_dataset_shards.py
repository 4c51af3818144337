"""The check before training, shared between processes (each checks every world_size-th record, then the
shares are merged through torch.distributed, gloo, two real processes): the same samples named unusable, in
the file's order, the same training ids and the same lengths for the length-grouped sampler as one process
that checks everything; and the same again when both read the check's cache at a warm start."""
import json
import os
import socket

import pytest
import torch.multiprocessing as mp
from PIL import Image

from llava_tiny.data import sample_id

pytestmark = pytest.mark.slow


def _write_data(root) -> str:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    Image.new("RGB", (20, 30), (200, 0, 0)).save(os.path.join(root, "images", "red.png"))
    good = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    samples = []
    for i in range(23):
        sample = {"id": f"s{i}", "image": "images/red.png", "conversations": good}
        if i % 7 == 3:
            sample["image"] = "images/missing.png"
        if i % 5 == 4:  # a first answer that cannot fit model_max_length
            sample["conversations"] = [good[0], {"from": "gpt", "value": " ".join(["red green blue"] * 60)}]
        if i % 6 == 1:
            sample.pop("id")  # named by its index in the whole file, whichever process checks it
        samples.append(sample)
    samples.append({"conversations": [{"from": "human", "value": "Hi?"}]})  # no answer, no id
    samples.append({"id": "text", "conversations": [{"from": "human", "value": "Say 1."}, {"from": "gpt", "value": "1"}]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path


def _dataset(llm, data_path, root, cache="none", skip=True):
    from transformers import AutoImageProcessor, AutoTokenizer

    from llava_tiny.conversation import prepare_tokenizer
    from llava_tiny.train.dataset import BadSamplesError, LazySupervisedDataset

    tokenizer = AutoTokenizer.from_pretrained(llm["llm"])
    prepare_tokenizer(tokenizer, "v1")
    try:
        dataset = LazySupervisedDataset(data_path, tokenizer, AutoImageProcessor.from_pretrained(llm["clip"]), "v1", 4,
                                        image_folder=root, model_max_length=96, skip_bad_samples=skip,
                                        max_bad_sample_fraction=1.0, data_cache_dir=cache)
    except BadSamplesError as err:
        return {"error": str(err)}
    return {"skipped": list(dataset.skipped.items()), "ids": dataset.ids, "lengths": dataset.modality_lengths,
            "first": dataset[0]["input_ids"].tolist()}


def _rank(rank, port, parts, data_path, root, out):
    import torch.distributed as dist

    from llava_tiny.train import dataset

    checked = []  # the records this process checked
    check_samples = dataset.check_samples
    dataset.check_samples = lambda samples, **kwargs: checked.extend(samples) or check_samples(samples, **kwargs)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cache = os.path.join(out, "cache")
        cold = {**_dataset(parts, data_path, root, cache), "checked": len(checked)}
        warm = {**_dataset(parts, data_path, root, cache), "checked": len(checked)}  # the cache both wrote/read
        stops = _dataset(parts, data_path, root, cache, skip=False)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"cold": cold, "warm": warm, "stops": stops}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_name_the_same_bad_samples_as_one(tmp_path, tiny_parts):
    root = str(tmp_path)
    data_path = _write_data(root)
    alone = json.loads(json.dumps(_dataset(tiny_parts, data_path, root)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, tiny_parts, data_path, root, root), nprocs=2, start_method="spawn")
    why = dict(alone["skipped"])
    assert "missing" in why["s3"] and "model_max_length" in why["s4"] and "#23" in why and "#1" not in why
    file_order = [sample_id(s, i) for i, s in enumerate(json.load(open(data_path)))]
    for rank in range(2):
        runs = json.load(open(os.path.join(root, f"rank{rank}.json")))
        for shared in runs["cold"], runs["warm"]:
            assert dict(shared["skipped"]) == why
            assert [sid for sid, _ in shared["skipped"]] == [sid for sid in file_order if sid in why]  # file order
            assert shared["ids"] == alone["ids"] and shared["lengths"] == alone["lengths"]
            assert shared["first"] == alone["first"]
            assert shared["checked"] == 13 - rank  # every other record of 25, once: the warm start checks none
        # Without --skip_bad_samples the run stops before step 1 naming the file and the samples, cache or not.
        assert data_path in runs["stops"]["error"] and "s3: image 'images/missing.png' missing" in runs["stops"]["error"]
