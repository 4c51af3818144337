"""`python -m bench.gpu_suite --dry-run`: the GPU suite's own code on tiny shapes on the CPU, so that it
cannot rot before a GPU runs it."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_suite_dry_run_measures_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry-run", "--out", str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=360)
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert {name: part["status"] for name, part in parts.items()} == {name: "ok" for name in (
        "environment", "models", "throughput", "memory", "generate", "deepspeed")}, result.stdout[-3000:] + "".join(
        f"\n--- {name}: {part['status']}\n{part['log_tail']}" for name, part in parts.items() if "log_tail" in part)
    assert result.returncode == 0
    assert parts["environment"]["kernels"]["deepspeed"] is True
    throughput = parts["throughput"]
    assert throughput["tokens_per_s_ours"] > 0 and throughput["tokens_per_s_baseline"] > 0
    rows = parts["memory"]["rows"]
    assert {(r["mode"], r["gradient_checkpointing"]) for r in rows} == {
        (mode, gc) for mode in ("full", "lora", "qlora") for gc in (True, False)}
    assert all(r["peak_gib"] > 0 and "error" not in r for r in rows), rows
    assert set(parts["generate"]["answers_per_s"]) == {"baseline", "batch1", "batch4"}
    assert parts["deepspeed"]["steps_logged"] == 3
    assert "GPU suite (dry)" in result.stdout and "memory: qlora" in result.stdout
    assert all(part["seconds"] <= part["budget_s"] for part in parts.values())  # the budgets are enforced
