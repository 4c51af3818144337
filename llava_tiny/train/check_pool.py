"""The check before training in chunks, checked by a pool of worker processes while the file is scanned.

The process that builds the dataset scans the file for the records' byte ranges (`record_store.iter_ranges`:
no decoding) and hands them out `CHUNK` records at a time to processes forked from it (they inherit the
dataset, its tokenizer and settings). Each decodes its records from the mapped file and checks them as one
process would (`LazySupervisedDataset._check_share`: the record's rules, its images, its length), keeping
what each distinct image's header showed for its later chunks; it sends back only what the dataset keeps:
ids, lengths, problems, image states, and one digest per record for the repeat check (`checks.RepeatFinder`,
run by the scanning process in the file's order). Results are taken in chunk order, so the problems, ids
and lengths are the same whatever the chunking or the number of workers (`tests/test_check_pool.py`). A
file of one chunk, one worker, or a platform without `fork` is checked in the process itself.

Workers per rank: `LLAVA_TINY_CHECK_WORKERS`, else the cores this process may use divided by the ranks on
the node (`LOCAL_WORLD_SIZE`). In flight at a time: two chunks per worker, so memory stays flat.
"""
from __future__ import annotations

import json
import mmap
import multiprocessing
import os
from array import array
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import chain

from ..checks import content_digest
from ..data import normalise_record, record_format, sample_id
from .record_store import iter_ranges, unreadable

CHUNK = 5_000  # records per piece of work
_WORKER: dict = {}  # in a worker: the dataset (inherited when forked) and what it found so far


def check_workers() -> int:
    """Processes that check in parallel on this rank (1: in the process itself)."""
    wanted = os.environ.get("LLAVA_TINY_CHECK_WORKERS")
    if wanted:
        return max(1, int(wanted))
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def check_chunk(dataset, path: str, first: int, starts: array, ends: array, rank: int, world: int,
                seen: dict) -> dict:
    """Decode and check the records at these byte ranges (record `first` onwards); `seen` carries what earlier
    chunks of this process found about images. Records outside this rank's share are named, not checked."""
    out = {"ids": [], "texts": 0, "digests": [], "problems": {}, "lengths": [], "images": {}}
    share = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for index, start, end in zip(range(first, first + len(starts)), starts, ends):
            try:
                record = json.loads(data[start:end])
            except ValueError:
                record = None
            if not isinstance(record, dict):
                unreadable(path)  # raises, naming the line and column
            sample = normalise_record(record)
            sid = sample_id(sample, index)
            out["ids"].append(sid)
            out["texts"] += record_format(sample) == "text"
            if rank == 0:
                out["digests"].append((sample.get("id") not in (None, ""), content_digest(sample)))
            if index % world == rank:
                # A share's records keep the names they have in the whole file (an id-less record: its index).
                share.append(sample if sample.get("id") is not None else {**sample, "id": sid})
    dataset._check_share(share, out, seen)
    return out


def _chunks(path: str) -> Iterator[tuple[int, array, array]]:
    first, starts, ends = 0, array("q"), array("q")
    for start, end in iter_ranges(path):
        starts.append(start)
        ends.append(end)
        if len(starts) == CHUNK:
            yield first, starts, ends
            first, starts, ends = first + CHUNK, array("q"), array("q")
    if starts:
        yield first, starts, ends


def _start_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the workers are the parallelism
    _WORKER["seen"] = {}


def _in_worker(path: str, first: int, starts: array, ends: array, rank: int, world: int) -> dict:
    return check_chunk(_WORKER["dataset"], path, first, starts, ends, rank, world, _WORKER["seen"])


def checked_chunks(dataset, path: str, rank: int = 0, world: int = 1) -> Iterator[tuple[int, array, array, dict]]:
    """(first record, starts, ends, what `check_chunk` found) for every chunk of `path`, in the file's order."""
    chunks = _chunks(path)
    head = [chunk for chunk in (next(chunks, None), next(chunks, None)) if chunk is not None]
    workers = check_workers()
    if workers < 2 or len(head) < 2:
        seen: dict = {}
        for chunk in chain(head, chunks):
            yield (*chunk, check_chunk(dataset, path, *chunk, rank, world, seen))
        return
    _WORKER["dataset"] = dataset  # before the fork: the workers inherit it (nothing is pickled)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker)
    try:
        pending: deque = deque()
        for chunk in chain(head, chunks):
            pending.append((chunk, pool.submit(_in_worker, path, *chunk, rank, world)))
            if len(pending) > 2 * workers:
                chunk, future = pending.popleft()
                yield (*chunk, future.result())
        while pending:
            chunk, future = pending.popleft()
            yield (*chunk, future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _WORKER.clear()
