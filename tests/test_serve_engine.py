"""The batching engine in-process: rows of one batch end at their own max_tokens and stop strings,
streamed deltas add up to the answer, cancelled rows stop, seeded sampling repeats; and the
serving benchmark's harness runs end to end."""
import json
import threading
import time

import pytest
import torch
from PIL import Image

from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch
from llava_tiny.model.builder import assemble_model, load_pretrained_model
from llava_tiny.serve.engine import Completion, Engine, Sampling, _settled
from llava_tiny.serve.served import ServedModel


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, tiny_parts):
    torch.manual_seed(7)
    path = str(tmp_path_factory.mktemp("engine") / "full")
    assemble_model(tiny_parts["llm"], tiny_parts["clip"]).save_pretrained(path)
    return load_pretrained_model(path, device="cpu")


@pytest.fixture(scope="module")
def engine(loaded):
    engine = Engine(ServedModel.resolve(loaded), max_batch_size=8)
    yield engine
    engine.close()


def _prompts(loaded):
    red = Image.new("RGB", (70, 56), (200, 30, 30))
    return [build_prompt(loaded, f"<image>\nWhat is in picture {i}?", [red]) for i in range(3)] + \
        [build_prompt(loaded, f"Tell me {i} things.") for i in range(3)]


def test_one_batch_with_different_lengths_equals_each_request_alone(loaded, engine):
    prompts = _prompts(loaded)
    lengths = [4, 20, 9, 20, 1, 13]
    alone = [generate_batch(loaded, [p], GenerationSettings(max_new_tokens=n))[0] for p, n in zip(prompts, lengths)]
    results, events = [None] * len(prompts), threading.Event()
    blocker = engine.submit(prompts[0], Sampling(max_tokens=40), lambda e: events.set())  # keeps the worker busy
    waits = []
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        done = threading.Event()
        waits.append(done)
        engine.submit(prompt, Sampling(max_tokens=n),
                      lambda e, i=i, done=done: (isinstance(e, Completion) and (results.__setitem__(i, e), done.set())))
    for done in waits:
        assert done.wait(timeout=60)
    blocker.cancel()
    assert [r.text for r in results] == alone
    assert engine.largest_batch >= len(prompts)  # they ran together
    for result, n in zip(results, lengths):
        assert result.completion_tokens <= n and (result.finish_reason == "length") == (result.completion_tokens == n)


def test_stream_adds_up_to_the_unstreamed_answer_and_stop_strings_cut(loaded, engine):
    prompt = _prompts(loaded)[3]
    events = list(engine.stream(prompt, Sampling(max_tokens=16), timeout=60))
    done = events[-1]
    assert isinstance(done, Completion) and "".join(events[:-1]) == done.text
    assert len(events) > 3
    quiet = list(engine.stream(prompt, Sampling(max_tokens=16), timeout=60, deltas=False))
    assert quiet == [done]  # not streamed: no delta events (no per-token decoding), the same answer
    stop = done.text.split()[1]
    cut = engine.complete(prompt, Sampling(max_tokens=16, stop=(stop,)), timeout=60)
    assert cut.text == done.text[:done.text.index(stop)].rstrip() and cut.finish_reason == "stop"


def test_leaving_a_stream_cancels_its_row(loaded, engine):
    prompt = _prompts(loaded)[0]
    stream = engine.stream(prompt, Sampling(max_tokens=500), timeout=60)
    next(stream)
    stream.close()  # the client went away
    after = engine.complete(prompt, Sampling(max_tokens=3), timeout=60)  # the worker is free again
    assert after.completion_tokens <= 3


def test_seeded_sampling_repeats_and_differs_from_greedy(loaded, engine):
    prompt = _prompts(loaded)[4]
    sampled = [engine.complete(prompt, Sampling(max_tokens=12, temperature=1.0, seed=11), timeout=60).text
               for _ in range(2)]
    greedy = engine.complete(prompt, Sampling(max_tokens=12), timeout=60).text
    assert sampled[0] == sampled[1] and sampled[0] != greedy


def test_settled_text_holds_back_what_may_still_change():
    assert _settled("red gre", ("green",)) == "red"
    assert _settled("a b", ("b c",)) == "a"
    assert _settled("red \ufffd", ()) == "red"
    assert _settled("red  ", ()) == "red"


def test_a_burst_of_requests_shares_one_batch_and_a_steady_stream_is_not_held_forever(loaded):
    """The next batch starts once no request arrived for `batch_window` s, at most `max_batch_wait` s after
    the first: clients arriving one after another, each within the window of the last, run together."""
    engine = Engine(ServedModel.resolve(loaded), max_batch_size=16, batch_window=0.3, max_batch_wait=1.5)
    try:
        def send(count, gap):
            done = [threading.Event() for _ in range(count)]
            for event in done:
                engine.submit(_prompts(loaded)[4], Sampling(max_tokens=2),
                              lambda e, event=event: isinstance(e, Completion) and event.set())
                time.sleep(gap)
            assert all(event.wait(timeout=60) for event in done)

        send(4, 0.15)  # 0.45 s from first to last: over one window, each arrival within the window of the last
        assert list(engine.recent_batch_sizes) == [4] and engine.batches_run == 1
        assert engine.recent_batch_sizes.maxlen == 1024  # bounded over a server's life (a list grew without end)
        send(12, 0.25)  # 2.75 s of arrivals: held at most 1.5 s, then the rest
        assert engine.batches_run >= 3 and sum(list(engine.recent_batch_sizes)[1:]) == 12
    finally:
        engine.close()


def test_closed_engine_refuses_requests(loaded):
    engine = Engine(ServedModel.resolve(loaded))
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(_prompts(loaded)[0], Sampling(), lambda e: None)


@pytest.mark.slow
def test_serve_benchmark_smoke_writes_every_figure(tmp_path):
    from bench import serve_throughput

    out = tmp_path / "serve.json"
    assert serve_throughput.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["load"]["failed"] == 0 and report["load"]["server_alive"]
    assert report["speedup_concurrent_vs_sequential"] > 0 and report["load"]["peak_rss_bytes"] > 0
    assert 0 < report["load"]["p50_latency_s"] <= report["load"]["p95_latency_s"]
