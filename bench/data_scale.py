"""How start-up cost grows with the data: seconds and resident memory to build the training dataset (the
check before training included) for 1k / 10k / 100k / 665k LLaVA-style records, cold and warm.

    python -m bench.data_scale --out bench_results/data_scale                      # 1k 10k 100k 665k
    python -m bench.data_scale --out /tmp/ds --sizes 200 1000 --length-scale 0.1   # a quick look

Each size gets a synthetic LLaVA-665k-like mix (`bench.workload.write_mix`: realistic answer lengths,
multi-turn VQA, shared images). Each measure runs in a fresh process, as a training start does:
`LazySupervisedDataset` with the TinyLlama (Llama-2) tokenizer, template v1, 576 image tokens,
model_max_length 2048. "cold" starts without the check's cache, "warm" with the cache the cold start
wrote. Writes data_scale.json and data_scale.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

IMAGE_TOKENS, MAX_LENGTH = 576, 2048


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure(data_path: str, cache_dir: str) -> dict:
    """Build the dataset once, in this process: seconds, resident memory before / after, and the peak."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from llava_tiny.conversation import prepare_tokenizer
    from llava_tiny.testing.tiny import LLAMA2_TOKENIZER
    from llava_tiny.train.check_pool import check_workers
    from llava_tiny.train.dataset import LazySupervisedDataset

    tokenizer = AutoTokenizer.from_pretrained(LLAMA2_TOKENIZER)
    prepare_tokenizer(tokenizer, "v1")
    before = _rss_mb()
    start = time.perf_counter()
    dataset = LazySupervisedDataset(data_path, tokenizer, CLIPImageProcessor(), "v1", IMAGE_TOKENS,
                                    image_folder=os.path.dirname(data_path), model_max_length=MAX_LENGTH,
                                    skip_bad_samples=True, max_bad_sample_fraction=1.0, data_cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    dataset[len(dataset) - 1]  # an item still loads (lazily, from the file)
    return {"seconds": round(seconds, 2), "records": dataset.num_records, "rss_before_mb": round(before),
            "rss_after_mb": round(_rss_mb()), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            # the check's worker processes (`check_pool`, forked: they share the parent's pages until written)
            "workers": check_workers(),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def _run_measure(data_path: str, cache_dir: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "bench.data_scale", "--measure", data_path, "--cache-dir", cache_dir],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"measuring {data_path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for phase, style in (("cold", "o-"), ("warm", "s--")):
        done = [r for r in rows if phase in r]
        sizes = [r["records"] for r in done]
        left.plot(sizes, [r[phase]["seconds"] for r in done], style, label=phase)
        right.plot(sizes, [r[phase]["rss_after_mb"] for r in done], style, label=f"{phase}: after")
        right.plot(sizes, [r[phase]["peak_rss_mb"] for r in done], style, alpha=0.4, label=f"{phase}: peak")
    cold = [r for r in rows if r.get("cold", {}).get("workers", 1) > 1]
    if cold:  # the check's forked workers: pages shared with the parent counted again
        right.plot([r["records"] for r in cold], [r["cold"]["worker_peak_rss_mb"] for r in cold], "^:",
                   label="cold: peak of one check worker")
    left.set(xlabel="records", ylabel="seconds to build the dataset", title="start-up")
    right.set(xlabel="records", ylabel="resident memory (MB)", title="memory per rank")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_results/data_scale")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 665_000])
    parser.add_argument("--length-scale", type=float, default=1.0, help="word counts x this (1.0: LLaVA-665k's)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one measure in this process (the child)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.cache_dir)))
        return 0
    from bench.workload import write_mix

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for size in args.sizes:
        folder = os.path.join(args.out, f"mix{size}")
        data_path = os.path.join(folder, "mix.json")
        if not os.path.isfile(data_path):
            write_mix(folder, size, args.length_scale)
        cache = os.path.join(folder, "cache")
        shutil.rmtree(cache, ignore_errors=True)
        row = {"records": size, "file_mb": round(os.path.getsize(data_path) / 2**20, 1)}
        rows.append(row)
        for phase in ("cold", "warm"):
            row[phase] = _run_measure(data_path, cache)
            print(f"{size:>8} records {phase}: {row[phase]}", flush=True)
            with open(os.path.join(args.out, "data_scale.json"), "w") as f:
                json.dump({"length_scale": args.length_scale, "rows": rows}, f, indent=2)
            plot(rows, os.path.join(args.out, "data_scale.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
