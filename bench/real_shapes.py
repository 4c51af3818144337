"""The reference shapes, run on this machine: TinyLlama-1.1B + CLIP ViT-L/14-336 + `mlp2x_gelu`
(576 image tokens), random weights written with stock transformers from the published configs, trained
on two DeepSpeed ranks the way users run it (`scripts/finetune_*.sh`), then saved, reloaded, resumed,
merged, exported, loaded by stock transformers and served.

    python -m bench.real_shapes --out runs/real_shapes            # LoRA, full (ZeRO-3 offload), QLoRA
    python -m bench.real_shapes --modes lora --out runs/rs_lora   # one mode
    python -m bench.real_shapes --dry-run --out /tmp/rs           # tiny shapes, same phases (CI runs --modes lora)

Every phase is its own process (tree); its wall seconds and peak resident memory (the sum over the
tree's processes, sampled every second; two ranks count twice) go to `real_shapes.json` and
`real_shapes.md`. A phase that fails stops its mode and is recorded with the end of its log; a phase
that would start with less memory available than `--min-free-gb` is skipped and said so.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil

from bench.real_shapes_parts import (DRY, REAL, bitsandbytes_4bit_on_cpu, stock_load_command, write_data,
                                     write_parts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"lora": ("finetune_lora.sh", "zero3"), "full": ("finetune_full.sh", "zero3_offload"),
           "qlora": ("finetune_qlora.sh", "zero2")}


class TreePeak:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, limit: int, interval: float = 1.0):
        self.root, self.limit, self.interval, self.peak, self.peak_per_process = pid, limit, interval, 0, 0
        self.stopped_at, self.reason = 0, ""  # the summed RSS at which the phase was killed, and why
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root)
                rss = []
                for process in [root, *root.children(recursive=True)]:
                    try:
                        rss.append(process.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, sum(rss))
                self.peak_per_process = max(self.peak_per_process, max(rss, default=0))
                short = psutil.virtual_memory().available < 1.5 * 2**30  # the machine is shared
                if (sum(rss) > self.limit or short) and not self.stopped_at:
                    # Stop it ourselves before the kernel's OOM killer picks a process, maybe someone else's.
                    self.stopped_at = sum(rss)
                    self.reason = "the machine had under 1.5 GB available" if short else "over --max-rss-gb"
                    kill_tree(self.root)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measured(name: str, cmd: list[str], log_path: str, env: dict, timeout: float, limit_gb: float) -> dict:
    """Run `cmd` (its own process group), timing it and sampling its tree's memory."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        with TreePeak(process.pid, int(limit_gb * 2**30)) as peak:
            status, hung = wait_for(process, log_path, timeout)
    result = {"phase": name, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": gb(peak.peak),
              "peak_rss_one_process_gb": gb(peak.peak_per_process), "returncode": status, "log": log_path}
    if hung:
        result["launcher_hang"] = "both ranks exited 0; DeepSpeed's launcher did not: killed 30 s later"
    if peak.stopped_at:
        result["killed_over_gb"], result["killed_because"] = gb(peak.stopped_at), peak.reason
    if status != 0:
        with open(log_path, errors="replace") as f:
            result["log_tail"] = f.read()[-3000:]
    return result


def wait_for(process: subprocess.Popen, log_path: str, timeout: float) -> tuple[int, bool]:
    """The exit status, and whether DeepSpeed's launcher was killed after every rank had exited 0 (seen once
    in a dry run: the launcher logged both exits, then never returned)."""
    deadline, both_exited = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            return process.wait(timeout=1), False
        except subprocess.TimeoutExpired:
            pass
        with open(log_path, errors="replace") as f:
            exited = f.read().count("exits successfully") >= 2
        both_exited = both_exited or (time.monotonic() if exited else None)
        if both_exited and time.monotonic() - both_exited > 30:
            kill_tree(process.pid)
            process.wait()
            return 0, True
    kill_tree(process.pid)
    return process.wait(), False


def kill_tree(pid: int) -> None:
    """Kill a process we started and every descendant (the launcher runs the ranks in a session of its own)."""
    try:
        root = psutil.Process(pid)
        processes = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def gb(n: int) -> float:
    return round(n / 2**30, 2)


def available_gb() -> float:
    return psutil.virtual_memory().available / 2**30


def training_phase(mode: str, parts: dict, data: dict, out: str, steps: int, shapes: dict,
                   resume_from: str | None = None) -> tuple[list, dict]:
    script, zero = SCRIPTS[mode]
    env = dict(os.environ, LLM=parts["llm"], VISION_TOWER=parts["clip"], PROJECTOR="", DATA=data["data_path"],
               IMAGES=data["image_folder"], OUT=out, ZERO=zero, NUM_GPUS="2", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's deepspeed
    flags = ["--max_steps", str(steps), "--save_steps", "2", "--per_device_train_batch_size", "1",
             "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0", "--gradient_checkpointing", "True",
             "--model_max_length", str(shapes["model_max_length"]), "--warmup_ratio", "0", "--save_total_limit", "2"]
    if mode == "qlora":
        flags += ["--optim", "adamw_torch"]  # the script's paged 8-bit AdamW needs CUDA
    if resume_from:  # one step more than the finished run, into a new folder (the run's own refuses other flags)
        flags += ["--resume_from_checkpoint", resume_from]
    return ["bash", os.path.join(ROOT, "scripts", script), *flags], env


def trained_steps(out: str) -> list[dict]:
    path = os.path.join(out, "trainer_state.json")
    if not os.path.isfile(path):
        return []
    return [h for h in json.load(open(path))["log_history"] if "loss" in h]


def folder_gb(path: str) -> float:
    return gb(sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files))


def run_mode(mode: str, parts: dict, data: dict, work: str, shapes: dict, args) -> list[dict]:
    """The phases of one mode, in order; stops at the first failure."""
    py = sys.executable
    out, resumed, merged, export = (os.path.join(work, mode, name) for name in ("run", "resumed", "merged", "export"))
    logs = os.path.join(work, mode, "logs")
    os.makedirs(logs, exist_ok=True)
    train_cmd, train_env = training_phase(mode, parts, data, out, 2, shapes)
    checkpoint = os.path.join(out, "checkpoint-2")
    resume_cmd, resume_env = training_phase(mode, parts, data, resumed, 3, shapes, checkpoint)
    env = dict(train_env, PYTHONPATH=ROOT)
    final = merged if mode != "full" else resumed
    phases = [
        ("train 2 steps + save", train_cmd, train_env),
        ("reload", [py, "-m", "bench.real_shapes_parts", "reload", out], env),
        ("resume 1 step + save", resume_cmd, resume_env),
    ]
    if mode != "full":
        merge = [py, "scripts/merge_lora.py", "--model-path", resumed, "--save-path", merged]
        phases.append(("merge_lora.py", merge, env))
    phases += [
        ("export_hf.py", [py, "scripts/export_hf.py", "--model-path", final, "--save-path", export], env),
        ("stock transformers load", stock_load_command(export), dict(env, PYTHONPATH="")),
        ("API request", [py, "-m", "bench.real_shapes_parts", "serve", export, data["image"]], env),
    ]
    results = []
    for name, cmd, phase_env in phases:
        free = available_gb()
        if free < args.min_free_gb:
            results.append({"phase": name, "skipped": f"{free:.1f} GB available < --min-free-gb {args.min_free_gb}"})
            break
        result = measured(name, cmd, os.path.join(logs, name.split()[0].replace("_", "-") + ".log"), phase_env,
                          args.phase_timeout, args.max_rss_gb)
        result["available_gb_before"] = round(free, 1)
        if name.startswith(("train", "resume")):
            run_dir = out if name.startswith("train") else resumed
            result["losses"] = [round(h["loss"], 4) for h in trained_steps(run_dir)]
            result["checkpoints_gb"] = {c: folder_gb(os.path.join(run_dir, c)) for c in sorted(os.listdir(run_dir))
                                        if c.startswith("checkpoint-")} if os.path.isdir(run_dir) else {}
            result["final_gb"] = round(folder_gb(run_dir) - sum(result["checkpoints_gb"].values()), 2)
        print(json.dumps({"mode": mode, **{k: v for k, v in result.items() if k != "log_tail"}}), flush=True)
        results.append(result)
        if result["returncode"] != 0:
            print(result.get("log_tail", ""), file=sys.stderr, flush=True)
            break
    return results


def markdown(report: dict) -> str:
    lines = [f"| mode | phase | seconds | peak RSS, all processes (GB) | peak RSS, largest process (GB) | result |",
             "|---|---|---|---|---|---|"]
    for mode, phases in report["modes"].items():
        if isinstance(phases, str):
            lines.append(f"| {mode} | - | - | - | - | {phases} |")
            continue
        for p in phases:
            if "skipped" in p:
                lines.append(f"| {mode} | {p['phase']} | - | - | - | skipped: {p['skipped']} |")
                continue
            what = "ok" if p["returncode"] == 0 else f"FAILED (exit {p['returncode']})"
            if p.get("killed_over_gb"):
                what = f"stopped by the bench at {p['killed_over_gb']} GB ({p['killed_because']})"
            if p.get("losses"):
                what += f"; losses {', '.join(str(x) for x in p['losses'])}"
            lines.append(f"| {mode} | {p['phase']} | {p['seconds']} | {p['peak_rss_gb']} | "
                         f"{p['peak_rss_one_process_gb']} | {what} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/real_shapes", help="work folder (models, runs, logs, the report)")
    parser.add_argument("--modes", default="lora,full,qlora", help="comma-separated: lora, full, qlora")
    parser.add_argument("--dry-run", action="store_true", help="tiny random shapes, the same phases (CI)")
    parser.add_argument("--min-free-gb", type=float, default=None,
                        help="skip a phase when less memory is available (default 14 real, 1 dry run)")
    parser.add_argument("--max-rss-gb", type=float, default=20,
                        help="kill a phase whose processes together hold more (recorded as such; default 20)")
    parser.add_argument("--phase-timeout", type=float, default=None, help="seconds (default 1800 real, 300 dry run)")
    args = parser.parse_args(argv)
    shapes = DRY if args.dry_run else REAL
    args.min_free_gb = args.min_free_gb if args.min_free_gb is not None else (1 if args.dry_run else 14)
    args.phase_timeout = args.phase_timeout or (300 if args.dry_run else 1800)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    parts = write_parts(os.path.join(args.out, "parts"), shapes)
    data = write_data(os.path.join(args.out, "data"), shapes)
    report = {"shapes": shapes["name"], "parts_seconds": round(time.perf_counter() - start, 1), "modes": {}}
    for mode in args.modes.split(","):
        shutil.rmtree(os.path.join(args.out, mode), ignore_errors=True)
        if mode == "qlora" and not bitsandbytes_4bit_on_cpu():
            report["modes"][mode] = "not run: bitsandbytes 4-bit does not run on this CPU"
            continue
        report["modes"][mode] = run_mode(mode, parts, data, args.out, shapes, args)
    with open(os.path.join(args.out, "real_shapes.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.join(args.out, "real_shapes.md"), "w") as f:
        f.write(table)
    print(table)
    failed = [m for m, phases in report["modes"].items()
              if not isinstance(phases, str) and any(p.get("returncode", 0) != 0 for p in phases)]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
