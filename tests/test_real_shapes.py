"""`bench.real_shapes --dry-run`: the reference-shapes bench at tiny shapes runs every phase end to end
(two DeepSpeed ranks per training run, merge, export, stock transformers, one API request) and writes its
figures. The real shapes are never run in CI. No timing asserts.

Only the LoRA mode runs here: it goes through every phase (two-rank train, reload, resume, merge with its parity
check, export, stock load, API); full fine-tuning under ZeRO-3 offload and QLoRA are the same phases with another
launcher script, each trained under DeepSpeed in tests/test_deepspeed.py and tests/test_train.py. The three modes
at tiny shapes take over ten minutes on two cores: `python -m bench.real_shapes --dry-run` runs them by hand."""
import json

import pytest

from bench import real_shapes

pytestmark = pytest.mark.slow  # several two-rank DeepSpeed launches


def test_dry_run_runs_every_phase_and_writes_the_table(tmp_path):
    out = tmp_path / "rs"
    assert real_shapes.main(["--dry-run", "--modes", "lora", "--out", str(out), "--min-free-gb", "0"]) == 0
    report = json.loads((out / "real_shapes.json").read_text())
    lora = {p["phase"]: p for p in report["modes"]["lora"]}
    assert list(lora) == ["train 2 steps + save", "reload", "resume 1 step + save", "merge_lora.py", "export_hf.py",
                          "stock transformers load", "API request"]
    for phase in report["modes"]["lora"]:
        assert phase["returncode"] == 0 and phase["seconds"] > 0 and phase["peak_rss_gb"] > 0, phase
    train, resume = lora["train 2 steps + save"], lora["resume 1 step + save"]
    assert len(train["losses"]) == 2 and resume["losses"][:2] == train["losses"] and len(resume["losses"]) == 3
    assert "checkpoint-2" in train["checkpoints_gb"]
    table = (out / "real_shapes.md").read_text()
    assert "| lora | merge_lora.py |" in table and "| lora | API request |" in table
