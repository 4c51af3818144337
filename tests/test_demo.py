"""scripts/demo.sh end to end, small: the whole chain runs and writes what a script can read; a rerun of the
finished folder skips every step (tests/test_demo_rerun.py covers the refusals and an interrupted folder)."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_never_overwrites(tmp_path):
    out = tmp_path / "demo"
    args = ["bash", "scripts/demo.sh", "--out", str(out), "--images", "120", "--steps", "12"]
    env = {key: value for key, value in os.environ.items() if key != "MASTER_PORT"}  # the launcher picks a free port
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "from-scratch variant" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "blind_accuracy", "majority_accuracy"):
        assert set(metrics[key]) == {"color", "shape", "count", "presence", "mean"}
    assert metrics["shared_images_across_splits"] == 0
    assert metrics["training_loss"]["first_step"] == 1
    assert (out / "report.md").is_file() and (out / "accuracy_by_type.png").is_file()
    assert (out / "loss_curve.png").is_file()
    assert "launch: MASTER_PORT not set; using port" in done.stderr
    assert (out / "model" / "checkpoint-12" / "trainer_state.json").is_file()  # what a rerun would resume from
    lines = done.stdout.strip().splitlines()
    assert lines[-3].startswith("trained model: mean accuracy") and lines[-2].startswith("blind control")
    # the same command again: every step done, nothing redone; other arguments: refused, nothing touched
    before = (out / "metrics.json").read_bytes()
    same = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert same.returncode == 0 and "generate, score, report: done in an earlier run" in same.stdout, same.stderr
    other = subprocess.run(["bash", "scripts/demo.sh", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode == 2 and "--images: '120' (in" in other.stderr and "--steps: '12' (in" in other.stderr
    assert (out / "metrics.json").read_bytes() == before
