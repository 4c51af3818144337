"""Training throughput: this project's fast path against stock transformers, in one run.

    python -m bench.train_throughput [--quick] [--out FILE.json] [--gpu-shapes]
        [--tokenizer llama2] [--extra-flags "--chunked_ce True"] [--sides baseline,ours,grouped]

Sides, on the same model (one saved LLaVA, identical weights), the same data (the same samples
in the same order: both use the Trainer's seeded random sampler) and the same batch size:

    baseline  stock `transformers.LlavaForConditionalGeneration` + HF `Trainer` + a plain
              right-padding collator over random batches (no grouping, no packing)
    ours      `llava_tiny.train.train.train(argv)`, the real entry point, with `--packing True`:
              one padding-free row per batch, attention within each sample, logits only where a
              token is supervised, the frozen tower without autograd
    grouped   (full mode) ours without packing, `--group_by_modality_length True` instead

Recipe on every side: full fine-tuning (LLM + projector trained, vision tower frozen), AdamW.
Each side runs in its own process, so its peak memory is its own. On a CPU the processes take
turns step by step, so a busy shared machine slows every side alike (a step's time counts only
that side's data fetch, forward, backward and optimizer step). Per side: supervised tokens/s
and samples/s (median of timed windows after warm-up), padding fraction of the computed tokens,
peak memory (RSS on a CPU, CUDA allocator peak on a GPU), time waiting for data, and MFU on a GPU.
The first step's loss is reported per side: equal values show that both ran the same model on
the same batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from .measure import TurnTaking, add_common_arguments, mode_of, use_cpu_threads
from .workload import SHAPES, write_mix, write_models

SIDES = ("baseline", "ours", "grouped")
SIDE_FLAGS = {"ours": ["--packing", "True"], "grouped": ["--group_by_modality_length", "True"]}


@dataclass
class RunPlan:
    """Everything a side needs; the parent writes the workload once and hands this to each side."""

    shapes: str
    batch_size: int
    warmup_steps: int
    windows: int
    window_steps: int
    num_samples: int
    sides: list[str]
    num_workers: int = 0  # data loader workers, on every side
    gradient_checkpointing: bool = False  # on every side
    extra_flags: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # None: the shapes' own
    peak_tflops: float | None = None
    parts: dict[str, str] = field(default_factory=dict)
    data_path: str = ""
    image_folder: str = ""
    workdir: str = ""

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.windows * self.window_steps


MODES = {  # shapes, batch size, warm-up steps, windows, steps per window, samples
    "smoke": dict(shapes="tiny", batch_size=4, warmup_steps=1, windows=2, window_steps=1, num_samples=32,
                  sides=["baseline", "ours"]),
    "quick": dict(shapes="cpu", batch_size=8, warmup_steps=3, windows=10, window_steps=2, num_samples=184,
                  sides=["baseline", "ours"]),
    "full": dict(shapes="cpu", batch_size=8, warmup_steps=3, windows=5, window_steps=4, num_samples=256,
                 sides=list(SIDES)),
    # TinyLlama + CLIP-L at batch 16 needs gradient checkpointing (as LLaVA's recipes use) to fit 80 GB
    "gpu": dict(shapes="gpu", batch_size=16, warmup_steps=5, windows=5, window_steps=10, num_samples=1024,
                sides=list(SIDES), num_workers=4, gradient_checkpointing=True),
}

LEARNING_RATE = 1e-5
SEED = 42  # train.py's default --seed: its projector initialisation equals the saved model's


# --- one side, in its own process ---------------------------------------------------------
def _dataset(plan: RunPlan, tokenizer, image_processor, image_seq_length: int):
    from llava_tiny.train.dataset import LazySupervisedDataset

    return LazySupervisedDataset(plan.data_path, tokenizer, image_processor, "llava_v1", image_seq_length,
                                 image_folder=plan.image_folder,
                                 model_max_length=SHAPES[plan.shapes].model_max_length)


class PaddingCollator:
    """The baseline's collator: right-pad ids and labels, attention mask, images stacked."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        import torch

        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


def _run_baseline(plan: RunPlan, probe, out_dir: str):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainingArguments

    on_gpu = torch.cuda.is_available()
    model = LlavaForConditionalGeneration.from_pretrained(
        plan.parts["llava"], dtype=torch.bfloat16 if on_gpu else torch.float32)
    model.model.vision_tower.requires_grad_(False)  # the same recipe as ours: LLM + projector train
    processor = AutoProcessor.from_pretrained(plan.parts["llava"])
    dataset = _dataset(plan, processor.tokenizer, processor.image_processor, model.config.image_seq_length)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=plan.batch_size, max_steps=plan.max_steps,
        learning_rate=LEARNING_RATE, logging_steps=10**6, logging_first_step=True, save_strategy="no",
        report_to="none", seed=SEED, dataloader_num_workers=plan.num_workers, remove_unused_columns=False,
        disable_tqdm=True, use_cpu=not on_gpu, bf16=on_gpu, dataloader_pin_memory=on_gpu,
        gradient_checkpointing=plan.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=PaddingCollator(processor.tokenizer.pad_token_id))
    probe.attach(trainer)
    trainer.train()
    return model


def _run_ours(plan: RunPlan, probe, out_dir: str, flags: list[str]):
    import torch

    from llava_tiny.train.arguments import parse_args
    from llava_tiny.train.train import build_trainer, run

    argv = ["--model_name_or_path", plan.parts["llm"], "--vision_tower", plan.parts["clip"],
            "--data_path", plan.data_path, "--image_folder", plan.image_folder, "--output_dir", out_dir,
            "--version", "llava_v1", "--model_max_length", str(SHAPES[plan.shapes].model_max_length),
            "--per_device_train_batch_size", str(plan.batch_size), "--max_steps", str(plan.max_steps),
            "--learning_rate", str(LEARNING_RATE), "--logging_steps", str(10**6), "--logging_first_step", "True",
            "--save_strategy", "no", "--report_to", "none", "--seed", str(SEED),
            "--dataloader_num_workers", str(plan.num_workers),
            "--gradient_checkpointing", str(plan.gradient_checkpointing),
            "--disable_tqdm", "True", *(["--bf16", "True"] if torch.cuda.is_available() else []), *flags]
    trainer = build_trainer(parse_args(argv), attn_implementation="flash_attention_2")  # as train_mem.py
    probe.attach(trainer)
    run(trainer)
    return trainer.model


def run_side(plan: RunPlan, side: str, turns=None) -> dict:
    """Train one side for `plan.max_steps` steps; its measured figures."""
    from .measure import MFU_FORMULA, TrainingProbe, environment, flops_per_batch_fn, model_flop_counts, peak_flops

    probe = TrainingProbe(plan.warmup_steps, plan.window_steps, turns)
    out_dir = os.path.join(plan.workdir, f"run-{side}")
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    if side == "baseline":
        model = _run_baseline(plan, probe, out_dir)
    else:
        model = _run_ours(plan, probe, out_dir, SIDE_FLAGS[side] + plan.extra_flags)
    counts = model_flop_counts(model)
    result = probe.summary(flops_per_batch_fn(counts), peak_flops(plan.peak_tflops))
    result.update(side=side, flags=SIDE_FLAGS.get(side, []) + (plan.extra_flags if side != "baseline" else []),
                  wall_s=time.perf_counter() - start, parameters=counts, environment=environment())
    if result["mfu"] is not None:
        result["mfu_formula"] = MFU_FORMULA
        result["peak_flops"] = peak_flops(plan.peak_tflops)
    return result


# --- the parent: workload, sides, ratios ----------------------------------------------------
def _side_command(plan_file: str, side: str, result_file: str, turn_fds=()) -> list[str]:
    command = [sys.executable, "-m", "bench.train_throughput", "--run-side", side, "--plan", plan_file,
               "--result", result_file]
    return command + (["--turn-fds", f"{turn_fds[0]},{turn_fds[1]}"] if turn_fds else [])


def run_sides(plan: RunPlan, interleave: bool) -> dict[str, dict]:
    """Each side in its own process (its own peak memory). With `interleave` the processes run at
    once but take turns step by step (`measure.TurnTaking`), so a noisy neighbour slows every side
    alike; otherwise one after the other (a GPU cannot hold several runs)."""
    plan_file = os.path.join(plan.workdir, "plan.json")
    with open(plan_file, "w") as f:
        json.dump(asdict(plan), f)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", HF_HUB_DISABLE_PROGRESS_BARS="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result_files = {side: os.path.join(plan.workdir, f"result-{side}.json") for side in plan.sides}

    def start(side, fds=()):
        # stderr to a file: a pipe nobody reads while another side runs would fill and stall the ring
        with open(os.path.join(plan.workdir, f"log-{side}.txt"), "w") as log:
            return subprocess.Popen(_side_command(plan_file, side, result_files[side], fds), env=env, cwd=repo,
                                    pass_fds=fds, stdout=log, stderr=subprocess.STDOUT)

    def finish(side, proc):
        if proc.wait() != 0:
            with open(os.path.join(plan.workdir, f"log-{side}.txt")) as log:
                raise RuntimeError(f"side {side!r} failed (exit {proc.returncode}):\n{log.read()[-4000:]}")

    if not interleave:
        for side in plan.sides:
            print(f"running {side} ...", flush=True)
            finish(side, start(side))
    else:
        print(f"running {', '.join(plan.sides)}, taking turns step by step ...", flush=True)
        pipes = [os.pipe() for _ in plan.sides]  # side i reads pipe i, writes pipe i+1
        procs = {}
        for i, side in enumerate(plan.sides):
            fds = (pipes[i][0], pipes[(i + 1) % len(pipes)][1])
            procs[side] = start(side, fds)
        os.write(pipes[0][1], b"t")  # the first side starts
        for read_fd, write_fd in pipes:  # only the sides hold the pipes now: a finished side reads as EOF
            os.close(read_fd)
            os.close(write_fd)
        try:
            for side, proc in procs.items():
                finish(side, proc)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
    results = {}
    for side in plan.sides:
        with open(result_files[side]) as f:
            results[side] = json.load(f)
    return results


def compare(results: dict[str, dict]) -> dict:
    """The figures asked for most: ours / baseline ratios and both padding fractions and peaks.

    Both sides train on the same batches in the same order (the same seeded sampler), so window w
    holds the same samples on both: the speed-up is the median over windows of the per-window
    ratio, which neither the mix of long and short batches nor a burst of load elsewhere moves
    much. The ratio of the two sides' median rates is reported too.
    """
    ours, base = results["ours"], results["baseline"]
    same_batches = ours["step_supervised_tokens"] == base["step_supervised_tokens"]

    def speedup(key):  # per-window ratios when the windows hold the same batches, else the medians' ratio
        if same_batches:
            return statistics.median(o / b for o, b in zip(ours[f"window_{key}"], base[f"window_{key}"]))
        return ours[key] / base[key]

    summary = {
        "speedup_tokens_per_s": speedup("supervised_tokens_per_s"),
        "speedup_samples_per_s": speedup("samples_per_s"),
        "speedup_ratio_of_medians": ours["supervised_tokens_per_s"] / base["supervised_tokens_per_s"],
        "same_batches": same_batches,
        "padding_fraction_ours": ours["padding_fraction"],
        "padding_fraction_baseline": base["padding_fraction"],
        "peak_memory_ours": ours["peak_memory_bytes"],
        "peak_memory_baseline": base["peak_memory_bytes"],
        "peak_memory_ratio": ours["peak_memory_bytes"] / base["peak_memory_bytes"],
        "tokens_per_s_ours": ours["supervised_tokens_per_s"],
        "tokens_per_s_baseline": base["supervised_tokens_per_s"],
        "first_step_loss_ours": ours["first_step_loss"],
        "first_step_loss_baseline": base["first_step_loss"],
    }
    if "grouped" in results:  # other batches (grouped by length): compare total rates
        grouped = results["grouped"]
        summary["speedup_samples_per_s_grouped"] = grouped["samples_per_s"] / base["samples_per_s"]
        summary["padding_fraction_grouped"] = grouped["padding_fraction"]
    return summary


def _print_report(plan: RunPlan, results: dict[str, dict], summary: dict) -> None:
    shapes = SHAPES[plan.shapes]
    print(f"\ntraining throughput: shapes {plan.shapes} (hidden {shapes.hidden}, {shapes.layers} layers, "
          f"image {shapes.image_size}px/{shapes.patch_size}), batch {plan.batch_size}, "
          f"{plan.windows} windows x {plan.window_steps} steps after {plan.warmup_steps} warm-up")
    header = f"{'side':<10}{'sup tok/s':>11}{'samples/s':>11}{'padding':>9}{'peak MB':>9}{'data wait':>11}" \
             f"{'MFU':>7}{'1st loss':>10}"
    print(header)
    for side, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        loss = f"{r['first_step_loss']:.4f}" if r["first_step_loss"] is not None else "-"
        print(f"{side:<10}{r['supervised_tokens_per_s']:>11.1f}{r['samples_per_s']:>11.2f}"
              f"{r['padding_fraction']:>9.1%}{r['peak_memory_bytes'] / 2**20:>9.0f}{r['data_wait_fraction']:>10.1%}"
              f"{mfu:>7}{loss:>10}")
    how = "median of same-batch window ratios" if summary["same_batches"] else "ratio of medians"
    print(f"ours / baseline ({how}): {summary['speedup_tokens_per_s']:.2f}x supervised tokens/s, "
          f"{summary['speedup_samples_per_s']:.2f}x samples/s; peak memory x{summary['peak_memory_ratio']:.2f}")
    if "speedup_samples_per_s_grouped" in summary:
        print(f"grouped / baseline: {summary['speedup_samples_per_s_grouped']:.2f}x samples/s (other batches)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, quick_help="about two minutes on a 2-core CPU",
                         smoke_help="tiny shapes, a few steps: checks the harness only")
    parser.add_argument("--sides", help=f"comma-separated subset of {','.join(SIDES)} (baseline and ours required)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int, help="data loader workers on every side (default: 0; 4 on a GPU)")
    parser.add_argument("--tokenizer", choices=["small", "llama2"],
                        help="'llama2': the real 32k vocabulary (large logits: where --chunked_ce matters)")
    parser.add_argument("--extra-flags", default="",
                        help="more llava_tiny flags for our sides, e.g. '--chunked_ce True'")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: known bf16 peaks)")
    parser.add_argument("--workdir", help="keep models, data and runs here (default: a temporary folder)")
    parser.add_argument("--run-side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--turn-fds", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_cpu_threads(args.threads)
    if args.run_side:  # a child process: one side
        with open(args.plan) as f:
            plan = RunPlan(**json.load(f))
        turns = TurnTaking(*map(int, args.turn_fds.split(","))) if args.turn_fds else None
        result = run_side(plan, args.run_side, turns)
        with open(args.result, "w") as f:
            json.dump(result, f, indent=2)
        return 0

    mode = mode_of(args)
    plan = RunPlan(**MODES[mode], extra_flags=args.extra_flags.split(), tokenizer=args.tokenizer,
                   peak_tflops=args.peak_tflops)
    if args.batch_size:
        plan.batch_size = args.batch_size
    if args.num_workers is not None:
        plan.num_workers = args.num_workers
    if args.sides:
        plan.sides = args.sides.split(",")
    if not {"baseline", "ours"} <= set(plan.sides) or not set(plan.sides) <= set(SIDES):
        raise SystemExit(f"--sides must hold baseline and ours, from {SIDES}; got {plan.sides}")
    plan.num_samples = max(plan.num_samples, plan.batch_size * plan.max_steps)  # one epoch covers the run
    workdir = args.workdir or tempfile.mkdtemp(prefix="llava-tiny-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        started = time.perf_counter()
        shapes = SHAPES[plan.shapes]
        if plan.tokenizer:
            shapes = dataclasses.replace(shapes, tokenizer=plan.tokenizer)
        plan.workdir = workdir
        plan.parts = write_models(os.path.join(workdir, "models"), shapes)
        plan.data_path = write_mix(os.path.join(workdir, "data"), plan.num_samples, shapes.length_scale)
        plan.image_folder = os.path.join(workdir, "data")
        import torch

        results = run_sides(plan, interleave=not torch.cuda.is_available())
        summary = compare(results)
        _print_report(plan, results, summary)
        report = {"benchmark": "train_throughput", "mode": mode, **summary,
                  "plan": {k: v for k, v in asdict(plan).items()
                           if k not in ("parts", "data_path", "image_folder", "workdir")},
                  "shapes": asdict(shapes), "sides": results, "wall_s": time.perf_counter() - started}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
            print(f"wrote {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
