"""The generation engine behind the API, the web chat and the CLI: requests that arrive while a batch
is running are taken together into the next batch.

One worker thread owns the model. Each round it takes every waiting request that decodes the same
way (greedy, or the same sampling settings) up to `max_batch_size`, and runs them as one
left-padded `generate` call (`llava_tiny.inference.generate_ids`, the path `eval.generate` uses).
A stopping criterion follows each row: it streams the row's new text, ends the row at its own
`max_tokens`, stop string or cancellation, and ends the batch when every row is done. A greedy
answer is therefore token for token the answer the request gets alone.

    engine = Engine(ServedModel.resolve(load_pretrained_model("runs/lora")))
    prompt = engine.model.prompt("<image>\\nWhat is shown?", [image])
    print(engine.complete(prompt, Sampling(max_tokens=64)).text)
    for event in engine.stream(prompt, Sampling()):  # str deltas, then the Completion
        ...
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..decoding import decode_answer
from ..inference import GenerationSettings, Prompt, generate_ids
from .served import ServedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How one request decodes. `temperature` 0 is greedy; `seed` makes a sampled answer repeatable."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def batch_key(self, request_id: int) -> tuple:
        """Requests with equal keys can share a `generate` call. A seeded sampled request runs alone:
        its random draws would otherwise depend on its batch mates."""
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", request_id)
        return ("sample", self.temperature, self.top_p)


@dataclass
class Completion:
    """A finished answer. `finish_reason` is "stop" (stop token or string) or "length" (max_tokens)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class EngineClosed(RuntimeError):
    """The engine was closed; no request is accepted any more."""


@dataclass
class Request:
    """A submitted request; `sink` receives str deltas (when `stream`), then a `Completion` (or an exception)."""

    id: int
    prompt: Prompt
    sampling: Sampling
    sink: Callable[[object], None]
    stream: bool = True
    cancelled: bool = field(default=False, repr=False)

    def cancel(self) -> None:
        """Stop generating for this request (a client that went away); its row ends at the next token."""
        self.cancelled = True


class _Row:
    """One request's state inside a running batch: its tokens, its text so far and what was sent."""

    def __init__(self, request: Request, stop_ids: tuple[int, ...], byte_ids: frozenset[int], tokenizer):
        self.request, self.stop_ids, self.byte_ids, self.tokenizer = request, stop_ids, byte_ids, tokenizer
        self.ids: list[int] = []
        self.generated = 0  # tokens the model produced for this row, a stop token included
        self.sent = ""
        self.finish_reason: str | None = None
        # Text is followed token by token only to stream it or to find a stop string in it; otherwise
        # the answer is decoded once, at the end (decoding each step costs O(length) per token).
        self.follows_text = request.stream or bool(request.sampling.stop)

    def text(self, ids: list[int]) -> str:
        return decode_answer(self.tokenizer, ids)  # never ends in a character cut by max_tokens

    def add(self, token: int) -> None:
        """Take the row's next token; send the text that can no longer change."""
        sampling = self.request.sampling
        self.generated += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            if len(self.ids) >= sampling.max_tokens:
                self.finish_reason = "length"
        if not self.follows_text:
            return
        text = self.text(self.ids)
        cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
        if cut >= 0:
            text, self.finish_reason = text[:cut].rstrip(), "stop"
        if self.finish_reason is None:
            # Byte-fallback tokens decode as a group: "?" may become part of "\ufffd\ufffd" when the
            # next byte arrives, so text from a trailing run of them is not final yet.
            settled = len(self.ids)
            while settled and self.ids[settled - 1] in self.byte_ids:
                settled -= 1
            text = text if settled == len(self.ids) else self.text(self.ids[:settled])
            text = _settled(text, sampling.stop)
        if text.startswith(self.sent) and len(text) > len(self.sent):
            if self.request.stream:
                _deliver(self.request, text[len(self.sent):])
            self.sent = text

    def completion(self, prompt_tokens: int) -> Completion:
        text = self.sent if self.follows_text else self.text(self.ids)
        return Completion(text, self.finish_reason or "length", prompt_tokens, self.generated)


def _settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing answer that later tokens cannot change: trailing spaces may be stripped
    at the end, a half-decoded character ends in U+FFFD, and an ending that begins a stop string may
    turn into it."""
    text = text.rstrip().rstrip("\ufffd").rstrip()
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - hold].rstrip()


class _Follow(StoppingCriteria):
    """Reads each step's new token per row; a row is done at its stop, its max_tokens or cancellation."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if row.finish_reason is None and not row.request.cancelled:
                row.add(token)
        done = [row.finish_reason is not None or row.request.cancelled for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Batches concurrent requests onto one model (see the module docstring). Thread-safe `submit`.

    Public state: `model` (the `ServedModel` it serves) and its counters `batches_run`, `largest_batch`
    and `recent_batch_sizes`."""

    def __init__(self, model: ServedModel, max_batch_size: int = 16, batch_window: float = 0.02,
                 max_batch_wait: float = 0.1):
        self.model, self.max_batch_size = model, max_batch_size
        # Clients that send at almost the same time share one batch: the worker starts a batch once no
        # request has arrived for `batch_window` s (at most `max_batch_wait` s after the first). A fixed
        # wait from the first arrival split 16 concurrent clients into two batches (the server parses
        # them one after another), and the second waited for the whole first one.
        self.batch_window, self.max_batch_wait = batch_window, max_batch_wait
        # The latest batches' sizes (bounded: a list of every batch grew for the server's whole life), and totals.
        self.recent_batch_sizes: deque[int] = deque(maxlen=1024)
        self.batches_run, self.largest_batch = 0, 0
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._next_id = 0
        self._worker = threading.Thread(target=self._run, name="llava-tiny-engine", daemon=True)
        self._worker.start()

    # --- submitting -----------------------------------------------------------------------
    def submit(self, prompt: Prompt, sampling: Sampling, sink: Callable[[object], None], stream: bool = True) -> Request:
        """Queue a request; `sink` is called from the engine thread with each event: the text deltas when
        `stream` (a request that is not streamed skips decoding every token), then the `Completion`."""
        if sampling.max_tokens < 1:
            raise ValueError(f"max_tokens is {sampling.max_tokens}; expected at least 1")
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._next_id += 1
            request = Request(self._next_id, prompt, sampling, sink, stream)
            self._waiting.append(request)
            self._cv.notify()
        return request

    def stream(self, prompt: Prompt, sampling: Sampling, timeout: float | None = None,
               deltas: bool = True) -> Iterator[object]:
        """Yield the answer's text deltas (str; none if not `deltas`), then its `Completion`. Leaving early
        cancels the request."""
        events: queue.Queue = queue.Queue()
        request = self.submit(prompt, sampling, events.put, stream=deltas)
        try:
            while True:
                event = events.get(timeout=timeout)
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            request.cancel()

    def complete(self, prompt: Prompt, sampling: Sampling, timeout: float | None = None) -> Completion:
        """The whole answer at once."""
        return [e for e in self.stream(prompt, sampling, timeout, deltas=False) if isinstance(e, Completion)][0]

    def close(self) -> None:
        """Finish the running batch, fail the waiting requests, stop the worker."""
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cv.notify()
        for request in waiting:
            request.sink(EngineClosed("the engine was closed before this request ran"))
        self._worker.join(timeout=60)

    # --- the worker -----------------------------------------------------------------------
    def _next_batch(self) -> list[Request] | None:
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            deadline = time.monotonic() + self.max_batch_wait
            while not self._closed and len(self._waiting) < self.max_batch_size:
                arrived = len(self._waiting)
                self._cv.wait(max(0.0, min(self.batch_window, deadline - time.monotonic())))
                if len(self._waiting) == arrived or time.monotonic() >= deadline:
                    break  # quiet for a window, or waited long enough
            if self._closed:
                return None
            first = self._waiting[0]
            key = first.sampling.batch_key(first.id)
            batch = [r for r in self._waiting if r.sampling.batch_key(r.id) == key][:self.max_batch_size]
            taken = {r.id for r in batch}
            self._waiting = deque(r for r in self._waiting if r.id not in taken)
            return [r for r in batch if not r.cancelled]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._generate(batch)

    def _generate(self, batch: list[Request]) -> None:
        model = self.model
        rows = [_Row(r, model.stop_ids, model.byte_ids, model.tokenizer) for r in batch]
        first = batch[0].sampling
        settings = GenerationSettings(max_new_tokens=max(r.sampling.max_tokens for r in batch),
                                      temperature=first.temperature, top_p=first.top_p,
                                      image_aspect_ratio=model.image_aspect_ratio,
                                      image_background=model.image_background)
        self.recent_batch_sizes.append(len(batch))
        self.batches_run, self.largest_batch = self.batches_run + 1, max(self.largest_batch, len(batch))
        try:
            if first.temperature > 0 and first.seed is not None:
                torch.manual_seed(first.seed)
            generate_ids(model.loaded, [r.prompt for r in batch], model.stop_ids, settings,
                         stopping_criteria=StoppingCriteriaList([_Follow(rows)]))
        except Exception as error:  # noqa: BLE001 - a failed batch fails its requests, not the server
            logger.exception("generation failed for a batch of %d request(s)", len(batch))
            for request in batch:
                _deliver(request, error)
            return
        for row in rows:
            if not row.request.cancelled:
                _deliver(row.request, row.completion(len(row.request.prompt.input_ids)))


def _deliver(request: Request, event: object) -> None:
    try:
        request.sink(event)
    except Exception:  # noqa: BLE001 - a client's closed event loop must not stop the worker
        logger.debug("request %d: its sink failed", request.id, exc_info=True)
