"""`bench.real_shapes --dry-run`: the reference-shapes bench at tiny shapes runs every phase end to end
(two DeepSpeed ranks per training run, merge, export, stock transformers, one API request) and writes its
figures. The real shapes are never run in CI. No timing asserts."""
import json

import pytest

from bench import real_shapes

pytestmark = pytest.mark.slow  # several two-rank DeepSpeed launches


def test_dry_run_runs_every_phase_and_writes_the_table(tmp_path):
    out = tmp_path / "rs"
    assert real_shapes.main(["--dry-run", "--modes", "lora,full,qlora", "--out", str(out), "--min-free-gb", "0"]) == 0
    report = json.loads((out / "real_shapes.json").read_text())
    lora = {p["phase"]: p for p in report["modes"]["lora"]}
    assert list(lora) == ["train 2 steps + save", "reload", "resume 1 step + save", "merge_lora.py", "export_hf.py",
                          "stock transformers load", "API request"]
    full = [p["phase"] for p in report["modes"]["full"]]
    assert "merge_lora.py" not in full and full[-1] == "API request"
    for mode in ("lora", "full"):
        for phase in report["modes"][mode]:
            assert phase["returncode"] == 0 and phase["seconds"] > 0 and phase["peak_rss_gb"] > 0, phase
    train, resume = lora["train 2 steps + save"], lora["resume 1 step + save"]
    assert len(train["losses"]) == 2 and resume["losses"][:2] == train["losses"] and len(resume["losses"]) == 3
    assert "checkpoint-2" in train["checkpoints_gb"]
    # QLoRA either ran every phase or says plainly why not.
    qlora = report["modes"]["qlora"]
    assert isinstance(qlora, str) and "bitsandbytes" in qlora or all(p["returncode"] == 0 for p in qlora)
    table = (out / "real_shapes.md").read_text()
    assert "| lora | merge_lora.py |" in table and "| full | API request |" in table
