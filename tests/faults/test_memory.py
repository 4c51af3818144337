"""A long run does not grow in memory: the resident set size of a real training process after warm-up
and after a few hundred more tiny steps (with checkpoints, NaN guard, skip bookkeeping all active)."""
import json
import os
import subprocess
import sys

import pytest

from faultlib import REPO, color_samples, subprocess_env, text_samples, train_argv, write_samples

WARM_UP, END = 100, 500
GROWTH_LIMIT = 48 * 2**20  # generous (tiny runs grow ~2 MiB), yet a leak of ~120 KiB a step crosses it

DRIVER = """
import json, os, sys
from transformers import TrainerCallback
from llava_tiny.train.arguments import parse_args
from llava_tiny.train.train import build_trainer, run

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

measured = {}

class MeasureRSS(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 25 == 0:
            measured[state.global_step] = rss()

trainer = build_trainer(parse_args(sys.argv[2:]))
trainer.add_callback(MeasureRSS())
run(trainer)
with open(sys.argv[1], "w") as f:
    json.dump(measured, f)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
def test_resident_memory_does_not_grow_over_a_long_run(tmp_path, tiny_parts):
    data = write_samples(tmp_path, color_samples(tmp_path, 8) + text_samples(8))
    argv = train_argv(tiny_parts, data, tmp_path / "out", "--max_steps", END, "--save_strategy", "steps",
                      "--save_steps", "100", "--save_total_limit", "1", "--logging_steps", "10",
                      "--group_by_modality_length", "True", "--skip_nan_steps", "True", "--skip_bad_samples", "True")
    driver, result = tmp_path / "driver.py", tmp_path / "rss.json"
    driver.write_text(DRIVER)
    run = subprocess.run([sys.executable, str(driver), str(result), *argv], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    rss = {int(step): value for step, value in json.loads(result.read_text()).items()}
    assert sorted(rss) == list(range(25, END + 1, 25))
    growth = rss[END] - rss[WARM_UP]
    trace = ", ".join(f"{step}: {value / 2**20:.0f} MiB" for step, value in sorted(rss.items()))
    assert growth < GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB from step {WARM_UP} to {END} ({trace})"
