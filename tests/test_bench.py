"""The benchmarks' smoke mode: the harness runs end to end and writes sane figures (no timing asserts)."""
import json

import pytest

from bench import generate_throughput, train_throughput


def test_train_throughput_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "train.json"
    assert train_throughput.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("speedup_tokens_per_s", "padding_fraction_ours", "padding_fraction_baseline", "peak_memory_ours",
                "peak_memory_baseline", "speedup_samples_per_s", "sides", "plan", "shapes"):
        assert key in report, key
    assert report["speedup_tokens_per_s"] > 0 and report["peak_memory_ours"] > 0 and report["peak_memory_baseline"] > 0
    assert 0 <= report["padding_fraction_ours"] <= report["padding_fraction_baseline"] < 1
    for side in report["sides"].values():
        assert side["supervised_tokens_per_s"] > 0 and side["samples_per_s"] > 0
        assert side["timed_steps"] == report["plan"]["windows"] * report["plan"]["window_steps"]
        assert side["samples_per_step"] == report["plan"]["batch_size"]
        assert 0 <= side["data_wait_fraction"] < 1 and side["mfu"] is None  # no GPU here
    # Same model, same first batch: the first step's loss agrees across sides.
    assert report["first_step_loss_ours"] == pytest.approx(report["first_step_loss_baseline"], abs=1e-3)
    # Both sides trained on the same samples, so they supervised the same tokens.
    sides = report["sides"]
    assert sides["ours"]["supervised_tokens_per_step"] == sides["baseline"]["supervised_tokens_per_step"]


def test_generate_throughput_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "generate.json"
    assert generate_throughput.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["sides"]) == {"baseline", "batch1", f"batch{report['batch_size']}"}
    for side in report["sides"].values():
        assert side["answers_per_s"] > 0 and 0 < side["new_tokens_per_answer"] <= report["max_new_tokens"]
    for key in ("speedup_batched_vs_baseline", "speedup_batched_vs_batch1", "speedup_batch1_vs_baseline"):
        assert report[key] > 0


def test_mfu_peak_is_found_by_whole_words_of_the_device_name():
    from bench.measure import peak_flops_for

    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("NVIDIA L40") is None  # not an L4
    assert peak_flops_for("NVIDIA A10G") is None  # not an A10
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
