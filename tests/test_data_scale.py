"""bench.data_scale at a tiny size: every figure is written, cold and warm, and the plot."""
import json

import pytest

from bench import data_scale

pytestmark = pytest.mark.slow  # two fresh processes (imports dominate)


def test_data_scale_writes_cold_and_warm_figures(tmp_path):
    assert data_scale.main(["--out", str(tmp_path), "--sizes", "40", "--length-scale", "0.1"]) == 0
    rows = json.load(open(tmp_path / "data_scale.json"))["rows"]
    assert [row["records"] for row in rows] == [40]
    for phase in "cold", "warm":
        figures = rows[0][phase]
        assert figures["records"] == 40 and figures["seconds"] > 0
        assert figures["peak_rss_mb"] >= figures["rss_after_mb"] > 0
    assert (tmp_path / "data_scale.png").stat().st_size > 0
    assert (tmp_path / "mix40" / "cache").is_dir()  # the warm start read what the cold one wrote
