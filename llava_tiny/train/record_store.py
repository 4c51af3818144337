"""Training records kept as byte ranges of the data file itself, read back through `mmap` one at a time.

LLaVA's 665k-record mixture held as Python dicts takes about 3 MB per 1,000 records on every rank
(2 GB per rank, times 8 ranks on a node). Here a rank holds two integers per record (where it starts
and ends in the file); `__getitem__` decodes the one record it needs. The mapped pages belong to the
page cache, shared by every rank on the node, and the kernel drops them under pressure.

`iter_records` reads the file once, streaming (a block at a time, never the whole list as dicts), and
yields each record with its byte range; a file it cannot read that way is handed to
`data.load_samples`, whose errors name the file and the record. `iter_ranges` finds the byte ranges
alone, without decoding the records (a scan of the mapped bytes: the check decodes them per chunk, in
parallel), and gives the same ranges.
"""
from __future__ import annotations

import codecs
import json
import mmap
import os
import re
from array import array
from collections.abc import Iterator

from ..data import DataFileError, load_samples, normalise_record

_BLOCK = 1 << 22  # characters decoded at a time; a record longer than a block is read across blocks


def _record_pattern(depth: int) -> re.Pattern:
    """One JSON object whose brackets nest at most `depth` deep, as bytes: strings (escapes included) are
    skipped whole, so a bracket inside one is text. UTF-8 continuation bytes are never '"' or '\\'."""
    string, atoms = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', rb'[^"{}\[\]]++'
    inner = rb"(?:" + string + rb"|" + atoms + rb")*+"
    for _ in range(depth):
        inner = rb"(?:" + string + rb"|" + atoms + rb"|\{" + inner + rb"\}|\[" + inner + rb"\])*+"
    return re.compile(rb"\{" + inner + rb"\}")


_RECORD = _record_pattern(6)  # LLaVA's records nest 3 deep (record, conversations, turn); deeper: `_iter_list`
_RELEASE = 1 << 26  # bytes scanned between handing the mapped pages back
_BLANK = re.compile(rb"[ \t\r\n]*+")
_SEPARATOR = re.compile(rb"[ \t\r\n]*+([,\]])[ \t\r\n]*+")


def iter_ranges(path: str) -> Iterator[tuple[int, int]]:
    """(start byte, end byte) of every record, as `iter_records` gives them, without decoding the records.
    A JSON list is scanned for balanced objects (a record that does not scan so, or a malformed file, is
    left to `iter_records` from there: the same ranges, or its error); JSONL is split into its lines."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        yield from ((start, end) for start, end, _ in iter_records(path))
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = _BLANK.match(data, 0).end()
        if path.endswith(".jsonl") or data[at:at + 1] != b"[":
            yield from ((start, end) for start, end, _ in iter_records(path))
            return
        at = _BLANK.match(data, at + 1).end()
        if data[at:at + 1] == b"]":
            return
        released = 0
        while True:
            found = _RECORD.match(data, at)
            after = _SEPARATOR.match(data, found.end()) if found else None
            if after is None:  # not a plain record: decode from here (its range, or the file's error)
                yield from ((start, end) for start, end, _ in iter_records(path) if start >= at)
                return
            yield at, found.end()
            if after.group(1) == b"]":
                return
            at = after.end()
            if at - released > _RELEASE and hasattr(mmap, "MADV_DONTNEED"):
                # Pages scanned leave this process's resident set (the page cache keeps them).
                upto = at - at % mmap.PAGESIZE
                data.madvise(mmap.MADV_DONTNEED, released, upto - released)
                released = upto


def iter_records(path: str) -> Iterator[tuple[int, int, dict]]:
    """(start byte, end byte, record as written) for every record of a LLaVA JSON list or JSONL file."""
    if not os.path.isfile(path):
        load_samples(path)  # raises its "file not found" error
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.endswith(".jsonl") or not head.startswith(b"["):
        if not path.endswith(".jsonl"):
            load_samples(path)  # JSON that is not a list (its error), or JSONL under another name (fine)
        yield from _iter_lines(path)
    else:
        yield from _iter_list(path)


def _iter_lines(path: str) -> Iterator[tuple[int, int, dict]]:
    start = 0
    with open(path, "rb") as f:
        for line in f:
            end = start + len(line)
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    load_samples(path)  # raises, naming the line
                    raise DataFileError(f"{path}: cannot read bytes {start}-{end} as a JSON object")
                yield start, end, record
            start = end


def _iter_list(path: str) -> Iterator[tuple[int, int, dict]]:
    """A JSON list decoded one element at a time (`raw_decode` on a sliding window of the text)."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    window = {"text": "", "at": 0, "byte": 0, "done": False}  # text read, the cursor in it, its byte in the file

    with open(path, "rb") as f:
        def refill() -> bool:
            if window["done"]:
                return False
            block = f.read(_BLOCK)
            window["done"] = not block
            window["text"] = window["text"][window["at"]:] + utf8.decode(block, final=not block)
            window["at"] = 0
            return True

        def advance(to: int) -> None:
            passed = window["text"][window["at"]:to]
            window["byte"] += len(passed) if passed.isascii() else len(passed.encode())
            window["at"] = to

        def next_char(blank: str = " \t\r\n") -> str:
            while True:
                text, at = window["text"], window["at"]
                while at < len(text) and text[at] in blank:
                    at += 1
                advance(at)
                if at < len(text) or not refill():
                    return text[at] if at < len(text) else ""

        if next_char(" \t\r\n\ufeff") != "[":
            unreadable(path)
        advance(window["at"] + 1)
        if next_char() == "]":
            return
        while True:
            while True:
                try:
                    record, end = decoder.raw_decode(window["text"], window["at"])
                    break
                except ValueError:
                    if not refill():
                        unreadable(path)
            if not isinstance(record, dict):
                unreadable(path)
            start = window["byte"]
            advance(end)
            yield start, window["byte"], record
            token = next_char()
            if token == "]":
                return
            if token != ",":
                unreadable(path)
            advance(window["at"] + 1)
            next_char()


def unreadable(path: str):
    load_samples(path)  # raises with the line, column and record it stopped at
    raise DataFileError(f"{path}: cannot be read as a JSON list of objects")


class RecordStore:
    """The records of `path` at the given byte ranges, decoded (and normalised, `data.normalise_record`) on
    access. Pickles as its path and ranges (dataloader workers map the file again)."""

    def __init__(self, path: str, starts: array, ends: array):
        self.path, self.starts, self.ends = path, starts, ends
        self._map = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = self._map[self.starts[index]:self.ends[index]]
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise DataFileError(f"{self.path}: record {index} (bytes {self.starts[index]}-{self.ends[index]}) no "
                                "longer reads as a JSON object: the file changed after the run started")
        return normalise_record(record)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, keep: list[int]) -> RecordStore:
        """The records at positions `keep`, in that order."""
        return RecordStore(self.path, array("q", (self.starts[i] for i in keep)), array("q", (self.ends[i] for i in keep)))

    def __getstate__(self):
        return {"path": self.path, "starts": self.starts, "ends": self.ends}

    def __setstate__(self, state):
        self.__init__(state["path"], state["starts"], state["ends"])
