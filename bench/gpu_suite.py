"""Every GPU figure in one call, within 9 minutes: prints a table and writes JSON.

    python -m bench.gpu_suite --out gpu.json          # one H100/H200: TinyLlama-1.1B + CLIP-L/14-336 shapes
    python -m bench.gpu_suite --dry-run               # the same code, tiny shapes, on a CPU (~75 s on an idle 2-core CPU; a test)

Parts, each in its own process with its own time budget (one that runs over is recorded as timed
out and the next one starts; the whole suite stops at its total budget):

    environment  GPU name, torch/CUDA, optional kernels found (flash-attn, liger-kernel, bitsandbytes, deepspeed)
    models       random-weight TinyLlama-1.1B + CLIP ViT-L/14-336 and a LLaVA-665k-like mix, written once
    throughput   bench.train_throughput's stock baseline and ours (packing; flash-attn varlen when importable,
                 else SDPA; --use_liger_kernel True when liger-kernel is installed): supervised tokens/s, MFU
    memory       peak memory, full / LoRA / QLoRA 4-bit x micro-batch 1/4/16 x gradient checkpointing on/off at
                 2048 tokens; out-of-memory is recorded as "oom"
    generate     answers/s at batch 1 and 16 (bench.generate_throughput)
    deepspeed    a one-GPU DeepSpeed ZeRO-2 run of train_mem.py (3 steps): a smoke test
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = {"gpu": 540, "dry": 240}
BUDGET_S = {  # per part: (GPU, dry run); a dry run takes ~75 s on an idle 2-core CPU, the rest is room for a busy one
    "environment": (20, 15), "models": (70, 30), "throughput": (150, 60), "memory": (150, 40),
    "generate": (90, 35), "deepspeed": (60, 60)}
PARTS = tuple(BUDGET_S)
OPTIONAL_KERNELS = ("flash_attn", "liger_kernel", "bitsandbytes", "deepspeed")
MEMORY_CASES = [(mode, batch, checkpointing) for mode in ("full", "lora", "qlora") for batch in (1, 4, 16)
                for checkpointing in (True, False)]
RECIPE_FLAGS = {"full": [], "lora": ["--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256"],
                "qlora": ["--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--bits", "4"]}


def _shapes(dry: bool):
    from .workload import SHAPES

    return SHAPES["tiny" if dry else "gpu"]


def _load(workdir: str, name: str) -> dict:
    with open(os.path.join(workdir, f"part-{name}.json")) as f:
        return json.load(f)


# --- the parts, each run in a child process -------------------------------------------------
def part_environment(workdir: str, dry: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None,
            "kernels": {name: importlib.util.find_spec(name) is not None for name in OPTIONAL_KERNELS}}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def part_models(workdir: str, dry: bool) -> dict:
    from .workload import write_mix, write_models

    shapes = _shapes(dry)
    parts = write_models(os.path.join(workdir, "models"), shapes)
    data = write_mix(os.path.join(workdir, "data"), 64 if dry else 1024, shapes.length_scale)
    return {"parts": parts, "data_path": data, "image_folder": os.path.join(workdir, "data"), "shapes": shapes.name}


def part_throughput(workdir: str, dry: bool) -> dict:
    from .train_throughput import RunPlan, compare, run_sides

    models = _load(workdir, "models")
    liger = importlib.util.find_spec("liger_kernel") is not None
    steps = dict(batch_size=4, warmup_steps=1, windows=2, window_steps=1) if dry else \
        dict(batch_size=16, warmup_steps=3, windows=3, window_steps=5, num_workers=4, gradient_checkpointing=True)
    plan = RunPlan(shapes=models["shapes"], num_samples=64 if dry else 1024, sides=["baseline", "ours"],
                   extra_flags=["--use_liger_kernel", "True"] if liger else [], parts=models["parts"],
                   data_path=models["data_path"], image_folder=models["image_folder"],
                   workdir=os.path.join(workdir, "throughput"), **steps)
    os.makedirs(plan.workdir, exist_ok=True)
    results = run_sides(plan, interleave=False)
    summary = compare(results)
    return {**summary, "liger_kernel": liger, "mfu_ours": results["ours"]["mfu"],
            "mfu_baseline": results["baseline"]["mfu"], "sides": results}


def _memory_case(models: dict, mode: str, batch: int, checkpointing: bool, tokens: int) -> dict:
    import torch

    from llava_tiny.model import image_seq_length
    from llava_tiny.train.arguments import parse_args
    from llava_tiny.train.train import load_model_for_training

    from .measure import peak_memory_bytes, reset_peak_memory

    on_gpu = torch.cuda.is_available()
    argv = ["--model_name_or_path", models["parts"]["llm"], "--vision_tower", models["parts"]["clip"],
            "--data_path", models["data_path"], "--output_dir", tempfile.mkdtemp(), "--report_to", "none",
            *(["--bf16", "True"] if on_gpu else []), *RECIPE_FLAGS[mode]]
    _, model, _ = load_model_for_training(parse_args(argv))
    device = "cuda" if on_gpu else "cpu"
    if not getattr(model, "is_quantized", False):
        model.to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    config = model.config
    size = config.vision_config.image_size
    image_tokens = image_seq_length(model)
    ids = torch.randint(3, config.text_config.vocab_size - 1, (batch, tokens), device=device)
    ids[:, 1:1 + image_tokens] = config.image_token_id
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=model.dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    measured = reset_peak_memory()
    try:
        for _ in range(2):  # the second step holds the optimizer state too
            loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"peak_gib": peak_memory_bytes() / 2**30, "measured": measured}
    except torch.cuda.OutOfMemoryError:
        return {"peak_gib": None, "oom": True}
    finally:
        del model, optimizer
        if on_gpu:
            torch.cuda.empty_cache()


def part_memory(workdir: str, dry: bool) -> dict:
    models = _load(workdir, "models")
    tokens = _shapes(dry).model_max_length if dry else 2048
    cases = MEMORY_CASES if not dry else [c for c in MEMORY_CASES if c[1] == 1]
    table = []
    for mode, batch, checkpointing in cases:
        row = {"mode": mode, "micro_batch": batch, "gradient_checkpointing": checkpointing, "tokens": tokens}
        try:
            row.update(_memory_case(models, mode, batch, checkpointing, tokens))
        except Exception as err:  # noqa: BLE001 - e.g. bitsandbytes not carried: the other rows still count
            row.update(peak_gib=None, error=f"{type(err).__name__}: {err}"[:300])
        table.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(workdir, "memory-rows.json"), "w") as f:  # what was measured, if time runs out
            json.dump(table, f)
    return {"rows": table}


def part_generate(workdir: str, dry: bool) -> dict:
    from . import generate_throughput

    generate_throughput.MODES["suite"] = dict(shapes=_shapes(dry).name, window=4 if dry else 16, windows=2,
                                              max_new_tokens=8 if dry else 32, batch=4 if dry else 16)
    result = generate_throughput.measure("suite", os.path.join(workdir, "generate"))
    return {"answers_per_s": {name: side["answers_per_s"] for name, side in result["sides"].items()}, **result}


def part_deepspeed(workdir: str, dry: bool) -> dict:
    models = _load(workdir, "models")
    out = os.path.join(workdir, "deepspeed")
    with socket.socket() as s:  # a free port: a fixed one may still be held by an earlier job
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "1", "--master_port",
               str(port), "llava_tiny/train/train_mem.py", "--deepspeed",
               "zero_configs/zero2.json", "--model_name_or_path", models["parts"]["llm"], "--vision_tower",
               models["parts"]["clip"], "--data_path", models["data_path"], "--image_folder", models["image_folder"],
               "--output_dir", out, "--max_steps", "3", "--per_device_train_batch_size", "4", "--save_strategy", "no",
               "--logging_steps", "1", "--report_to", "none", "--bf16", "True", "--gradient_checkpointing", "True",
               "--dataloader_num_workers", "0"]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    losses = [line for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    if result.returncode != 0:
        raise RuntimeError(f"deepspeed exit {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    return {"seconds": time.time() - started, "steps_logged": len(losses), "last_loss": losses[-1] if losses else None}


# --- the parent: budgets, table, JSON ---------------------------------------------------------
def run_part(name: str, workdir: str, dry: bool, budget: float) -> dict:
    """One part in its own process, stopped at `budget` seconds; its figures or what went wrong."""
    command = [sys.executable, "-m", "bench.gpu_suite", "--part", name, "--workdir", workdir] + \
        (["--dry-run"] if dry else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=REPO)
    started = time.time()
    log_path = os.path.join(workdir, f"log-{name}.txt")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(budget, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    seconds = time.time() - started
    status = {"seconds": round(seconds, 1), "budget_s": budget}
    if proc.returncode == 0:
        return {**status, "status": "ok", **_load(workdir, name)}
    with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
    timed_out = proc.returncode == -9
    return {**status, "status": f"timed out after {budget:.0f} s" if timed_out else f"failed (exit {proc.returncode})",
            "log_tail": tail}


def _print_table(report: dict) -> None:
    env = report["parts"].get("environment", {})
    print(f"\nGPU suite ({report['mode']}): {env.get('gpu') or 'CPU'}, torch {env.get('torch')}, "
          f"CUDA {env.get('cuda')}, kernels {env.get('kernels')}")
    for name, part in report["parts"].items():
        print(f"  {name:<11} {part['status']:<24} {part['seconds']:>6.1f} s / {part['budget_s']} s")
    throughput = report["parts"].get("throughput", {})
    if throughput.get("status") == "ok":
        mfu = throughput["mfu_ours"]
        print(f"throughput: ours {throughput['tokens_per_s_ours']:.0f} vs baseline "
              f"{throughput['tokens_per_s_baseline']:.0f} supervised tokens/s ({throughput['speedup_tokens_per_s']:.2f}x);"
              f" MFU ours {f'{mfu:.1%}' if mfu is not None else '-'}")
    memory = report["parts"].get("memory", {})
    for row in memory.get("rows", []):
        peak = "oom" if row.get("oom") else row["error"] if row.get("error") else f"{row['peak_gib']:.2f} GiB"
        print(f"memory: {row['mode']:<6} micro-batch {row['micro_batch']:>2} checkpointing "
              f"{'on ' if row['gradient_checkpointing'] else 'off'} {row['tokens']} tokens: {peak}")
    generate = report["parts"].get("generate", {})
    if generate.get("status") == "ok":
        print("generation answers/s: " + ", ".join(f"{k} {v:.2f}" for k, v in generate["answers_per_s"].items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write every figure to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (~75 s): checks the code")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--workdir", help="keep models, data and logs here (default: a temporary folder)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:  # a child: one part, its figures to workdir/part-NAME.json
        if args.dry_run:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ["OMP_NUM_THREADS"] = "1"
        result = globals()[f"part_{args.part}"](args.workdir, args.dry_run)
        with open(os.path.join(args.workdir, f"part-{args.part}.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
        return 0
    mode = "dry" if args.dry_run else "gpu"
    workdir = args.workdir or tempfile.mkdtemp(prefix="llava-tiny-gpu-suite-")
    os.makedirs(workdir, exist_ok=True)
    deadline = time.time() + TOTAL_BUDGET_S[mode]
    report = {"benchmark": "gpu_suite", "mode": mode, "parts": {}}
    try:
        for name in args.parts.split(","):
            budget = min(BUDGET_S[name][mode == "dry"], deadline - time.time())
            if budget < 5:
                report["parts"][name] = {"status": "skipped: total budget spent", "seconds": 0.0, "budget_s": 0}
                continue
            report["parts"][name] = run_part(name, workdir, args.dry_run, budget)
            print(f"{name}: {report['parts'][name]['status']} ({report['parts'][name]['seconds']} s)", flush=True)
        _print_table(report)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, default=str)
            print(f"wrote {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
