"""Serving throughput and a bounded load test of `llava_tiny.serve.api`, over loopback with the `openai` client.

    python -m bench.serve_throughput [--quick | --smoke] [--out FILE.json] [--threads 1]

One server (a child process, random weights of the benchmark shapes, greedy decoding of a fixed
length so every answer costs the same), then:

    sequential   N image questions, one request at a time
    concurrent   the same N questions from N clients at once (batched by the engine)
    load         R requests from C clients (each client sends its next request when the last is
                 answered); counts failures, p50/p95 latency, and the server's peak RSS (VmHWM)

Reported: answers/s of each side and their ratio (the batching gain), the load test's failures,
latencies and resident memory. Figures are ratios measured on one machine, not asserted anywhere.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from .measure import add_common_arguments, environment, mode_of, use_cpu_threads
from .workload import SHAPES, write_models

MODES = {  # shapes, clients (= requests per throughput side), new tokens, load-test requests
    "smoke": dict(shapes="tiny", clients=4, max_tokens=8, load_requests=12, rounds=1),
    "quick": dict(shapes="cpu", clients=16, max_tokens=32, load_requests=300, rounds=2),
    "full": dict(shapes="cpu", clients=16, max_tokens=64, load_requests=300, rounds=3),
    "gpu": dict(shapes="gpu", clients=16, max_tokens=64, load_requests=300, rounds=3),
}


def _image_url(seed: int, size: int) -> str:
    from PIL import Image

    image = Image.effect_noise((size, size), 30 + seed % 50).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _server_rss(pid: int) -> dict:
    """The server's resident memory now and at its peak (bytes)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return {"rss_bytes": out.get("VmRSS", 0), "peak_rss_bytes": out.get("VmHWM", 0)}


def measure(mode: str, workdir: str, threads: int, max_tokens: int | None = None) -> dict:
    import openai

    from llava_tiny.serve.launch import ServerProcess

    plan = {**MODES[mode], **({"max_tokens": max_tokens} if max_tokens else {})}
    shapes = SHAPES[plan["shapes"]]
    parts = write_models(os.path.join(workdir, "models"), shapes)
    images = [_image_url(i, shapes.image_size) for i in range(8)]
    args = ["--model-path", parts["llava"], "--served-model-name", "bench", "--log-level", "warning",
            "--max-batch-size", str(plan["clients"])]
    env = {"OMP_NUM_THREADS": str(threads)}
    with ServerProcess("llava_tiny.serve.api", args, os.path.join(workdir, "server.log"), env=env,
                       timeout=600) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

        def ask(i: int) -> float:
            start = time.perf_counter()
            response = client.chat.completions.create(
                model="bench", temperature=0, max_tokens=plan["max_tokens"],
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i % 8]}},
                                                        {"type": "text", "text": f"Describe picture {i}."}]}])
            if not response.choices[0].message.content:
                raise RuntimeError("empty answer")
            return time.perf_counter() - start

        n = plan["clients"]
        ask(0)  # warm-up
        sides = {"sequential": [], "concurrent": []}
        with ThreadPoolExecutor(n) as pool:
            for _ in range(plan["rounds"]):  # alternate, so load from elsewhere hits both sides
                start = time.perf_counter()
                for i in range(n):
                    ask(i)
                sides["sequential"].append(n / (time.perf_counter() - start))
                start = time.perf_counter()
                list(pool.map(ask, range(n)))
                sides["concurrent"].append(n / (time.perf_counter() - start))
            latencies, failures = [], 0
            start = time.perf_counter()
            futures = [pool.submit(ask, i) for i in range(plan["load_requests"])]
            for future in futures:
                try:
                    latencies.append(future.result(timeout=900))
                except Exception as error:  # noqa: BLE001 - counted, the test goes on
                    failures += 1
                    print(f"request failed: {error}", file=sys.stderr)
            load_seconds = time.perf_counter() - start
        memory = _server_rss(server.process.pid)
        alive = server.alive()
    ordered = sorted(latencies) or [float("nan")]
    return {
        "benchmark": "serve_throughput", "mode": mode, "shapes": shapes.name, "max_tokens": plan["max_tokens"],
        "clients": n, "answers_per_s": {k: statistics.median(v) for k, v in sides.items()},
        "speedup_concurrent_vs_sequential": statistics.median(sides["concurrent"]) / statistics.median(
            sides["sequential"]),
        "rounds": sides,
        "load": {"requests": plan["load_requests"], "clients": n, "failed": failures, "seconds": load_seconds,
                 "answers_per_s": len(latencies) / load_seconds,
                 "p50_latency_s": ordered[len(ordered) // 2], "p95_latency_s": ordered[int(len(ordered) * 0.95) - 1],
                 "server_alive": alive, **memory},
        "environment": environment(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, quick_help="a few minutes on a 2-core CPU",
                         smoke_help="tiny shapes, a dozen requests: checks the harness only")
    parser.add_argument("--rss-bound-mib", type=float, default=1024,
                        help="fail (exit 1) when the server's peak RSS exceeds this (default 1 GiB, for the CPU shapes)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="new tokens per answer (default: the mode's, 32 quick / 64 full); longer answers batch better")
    args = parser.parse_args(argv)
    use_cpu_threads(args.threads)
    mode = mode_of(args)
    workdir = tempfile.mkdtemp(prefix="llava-tiny-servebench-")
    try:
        started = time.perf_counter()
        report = measure(mode, workdir, args.threads, args.max_tokens)
        report["wall_s"] = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = report["load"]
    print(f"\nserving: shapes {report['shapes']}, {report['max_tokens']} new tokens, greedy, {report['clients']} clients")
    for side, rate in report["answers_per_s"].items():
        print(f"{side:<11}{rate:>9.2f} answers/s")
    print(f"concurrent / sequential: {report['speedup_concurrent_vs_sequential']:.2f}x")
    print(f"load: {load['requests']} requests from {load['clients']} clients in {load['seconds']:.1f} s, "
          f"{load['failed']} failed, p50 {load['p50_latency_s']:.2f} s, p95 {load['p95_latency_s']:.2f} s, "
          f"server RSS {load['rss_bytes'] / 2**20:.0f} MiB (peak {load['peak_rss_bytes'] / 2**20:.0f} MiB)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    within = load["peak_rss_bytes"] <= args.rss_bound_mib * 2**20
    if not within:
        print(f"server peak RSS over the bound of {args.rss_bound_mib:.0f} MiB")
    return 0 if load["failed"] == 0 and load["server_alive"] and within else 1


if __name__ == "__main__":
    sys.exit(main())
