"""scripts/demo.sh end to end, small: the whole chain runs and writes what a script can read."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_never_overwrites(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, MASTER_PORT="29517")
    done = subprocess.run(["bash", "scripts/demo.sh", "--out", str(out), "--images", "120", "--steps", "12"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "from-scratch variant" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "blind_accuracy", "majority_accuracy"):
        assert set(metrics[key]) == {"color", "shape", "count", "presence", "mean"}
    assert metrics["shared_images_across_splits"] == 0
    assert metrics["training_loss"]["first_step"] == 1
    assert (out / "report.md").is_file() and (out / "accuracy_by_type.png").is_file()
    assert (out / "loss_curve.png").is_file()
    lines = done.stdout.strip().splitlines()
    assert lines[-3].startswith("trained model: mean accuracy") and lines[-2].startswith("blind control")
    # the same --out again: refused, nothing touched
    before = (out / "metrics.json").read_bytes()
    again = subprocess.run(["bash", "scripts/demo.sh", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "is not empty" in again.stderr
    assert (out / "metrics.json").read_bytes() == before
