"""Generation throughput: answers/s of this project's batched generation against a one-by-one loop.

    python -m bench.generate_throughput [--quick] [--out FILE.json] [--gpu-shapes]

Sides, on the same saved model, the same image questions and greedy decoding of the same length:

    baseline  stock `LlavaForConditionalGeneration` + its saved `LlavaProcessor`, one `generate`
              call per question (how most evaluation scripts run)
    batch1    `llava_tiny.inference.generate_batch` with one prompt per call
    batch16   `llava_tiny.inference.generate_batch` with 16 left-padded prompts per call (eval.generate)

Per side: answers/s and new tokens/s (median over timed windows after a warm-up call), where new
tokens are counted from `generate`'s output up to each answer's stop token. The windows run
round-robin over the sides (same questions per window), so load from elsewhere hits all alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from .measure import add_common_arguments, mode_of, use_cpu_threads
from .workload import SHAPES, write_mix, write_models

MODES = {  # shapes, questions per timed window, windows, new tokens per answer
    "smoke": dict(shapes="tiny", window=4, windows=2, max_new_tokens=8, batch=4),
    "quick": dict(shapes="cpu", window=16, windows=4, max_new_tokens=32, batch=16),
    "full": dict(shapes="cpu", window=32, windows=3, max_new_tokens=64, batch=16),
    "gpu": dict(shapes="gpu", window=64, windows=3, max_new_tokens=64, batch=16),
}


def image_questions(data_path: str, image_folder: str, count: int) -> list[tuple[str, str]]:
    """(question with <image>, image path) from the first turn of the mix's image samples."""
    with open(data_path) as f:
        samples = json.load(f)
    questions = [(s["conversations"][0]["value"], os.path.join(image_folder, s["image"]))
                 for s in samples if "image" in s]
    if len(questions) < count:
        raise ValueError(f"{data_path} holds {len(questions)} image questions; {count} needed")
    return questions[:count]


class _NewTokenCounter:
    """Wraps `model.generate` to count each answer's new tokens (up to its first stop token)."""

    def __init__(self, model, stop_ids: set[int]):
        self.generate, self.stop_ids, self.count = model.generate, stop_ids, 0
        model.generate = self

    def __call__(self, *args, **kwargs):
        output = self.generate(*args, **kwargs)
        prompt_width = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        for row in output[:, prompt_width:].tolist():
            stop = next((i for i, token in enumerate(row) if token in self.stop_ids), len(row))
            self.count += stop
        return output


def measure(mode: str, workdir: str) -> dict:
    """Load the model twice (stock and ours), warm every side up, then time the windows round-robin
    (window w of every side, then window w+1): a burst of load on a shared machine hits all sides."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_tiny.conversation import stop_token_ids
    from llava_tiny.inference import GenerationSettings, build_prompt, generate_batch
    from llava_tiny.model.builder import load_pretrained_model

    from .measure import environment

    plan = MODES[mode]
    shapes = SHAPES[plan["shapes"]]
    parts = write_models(os.path.join(workdir, "models"), shapes)
    needed = plan["window"] * plan["windows"] + plan["batch"]
    data_path = write_mix(os.path.join(workdir, "data"), needed * 2, shapes.length_scale)
    questions = image_questions(data_path, os.path.join(workdir, "data"), needed)
    images = {path: Image.open(path).convert("RGB") for _, path in questions}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    new_tokens = plan["max_new_tokens"]
    warm, timed = questions[:plan["batch"]], questions[plan["batch"]:]

    # baseline: stock model and processor, one question at a time
    stock = LlavaForConditionalGeneration.from_pretrained(parts["llava"], dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(parts["llava"])
    stops = stop_token_ids(processor.tokenizer, "llava_v1")
    stock_tokens = _NewTokenCounter(stock, set(stops))

    def stock_answers(batch):
        for question, path in batch:
            text = question.replace("<image>\n", "")
            prompt = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}])
            inputs = processor(images=images[path], text=prompt, return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode():
                stock.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops,
                               pad_token_id=processor.tokenizer.pad_token_id)

    # ours: generate_batch, one prompt per call, or `batch` prompts per call
    loaded = load_pretrained_model(parts["llava"], device=device, dtype=dtype)
    our_tokens = _NewTokenCounter(loaded.model, set(stops))
    settings = GenerationSettings(max_new_tokens=new_tokens)

    def our_answers(size):
        def run(batch):
            for start in range(0, len(batch), size):
                prompts = [build_prompt(loaded, q, [images[p]]) for q, p in batch[start:start + size]]
                generate_batch(loaded, prompts, settings)
        return run

    batched = f"batch{plan['batch']}"
    sides = {"baseline": (stock_answers, stock_tokens), "batch1": (our_answers(1), our_tokens),
             batched: (our_answers(plan["batch"]), our_tokens)}
    times = {name: ([], []) for name in sides}
    for name, (answer, _) in sides.items():
        answer(warm[:1] if name != batched else warm)
    for w in range(plan["windows"]):
        window = timed[w * plan["window"]:(w + 1) * plan["window"]]
        for name, (answer, counter) in sides.items():
            before, start = counter.count, time.perf_counter()
            answer(window)
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(counter.count - before)

    results = {}
    for name, (seconds, tokens) in times.items():
        results[name] = {
            "answers_per_s": statistics.median(plan["window"] / s for s in seconds),
            "new_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
            "new_tokens_per_answer": sum(tokens) / (plan["window"] * len(seconds)),
            "window_seconds": seconds,
        }
    return {
        "benchmark": "generate_throughput", "mode": mode, "shapes": shapes.name, "max_new_tokens": new_tokens,
        "questions_per_window": plan["window"], "windows": plan["windows"], "batch_size": plan["batch"],
        "speedup_batched_vs_baseline": results[batched]["answers_per_s"] / results["baseline"]["answers_per_s"],
        "speedup_batched_vs_batch1": results[batched]["answers_per_s"] / results["batch1"]["answers_per_s"],
        "speedup_batch1_vs_baseline": results["batch1"]["answers_per_s"] / results["baseline"]["answers_per_s"],
        "sides": results, "environment": environment(),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, quick_help="under a minute on a 2-core CPU",
                         smoke_help="tiny shapes, a few answers: checks the harness only")
    parser.add_argument("--workdir", help="keep the model and data here (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_cpu_threads(args.threads)
    mode = mode_of(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="llava-tiny-genbench-")
    try:
        started = time.perf_counter()
        report = measure(mode, workdir)
        report["wall_s"] = time.perf_counter() - started
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ngeneration throughput: shapes {report['shapes']}, {report['max_new_tokens']} new tokens max, greedy, "
          f"{report['windows']} windows of {report['questions_per_window']} questions")
    print(f"{'side':<10}{'answers/s':>11}{'new tok/s':>11}{'tok/answer':>12}")
    for name, side in report["sides"].items():
        print(f"{name:<10}{side['answers_per_s']:>11.2f}{side['new_tokens_per_s']:>11.1f}"
              f"{side['new_tokens_per_answer']:>12.1f}")
    print(f"batch {report['batch_size']} / baseline loop: {report['speedup_batched_vs_baseline']:.2f}x answers/s; "
          f"batch {report['batch_size']} / batch 1: {report['speedup_batched_vs_batch1']:.2f}x; "
          f"batch 1 / baseline: {report['speedup_batch1_vs_baseline']:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
