"""data_tools.filter / prepare: sources by prefix, field and regex; exact kept/dropped counts; missing images."""
import json

import pytest

from data_tools import filter as filter_tool
from data_tools import prepare
from data_tools.filter import SourceRule, filter_samples
from data_tools.testing import write_rs_dataset


@pytest.fixture
def rs(tmp_path):
    return write_rs_dataset(str(tmp_path))


def test_prefix_rule_keeps_four_sources_and_writes_source(rs, tmp_path, capsys):
    out, report = tmp_path / "rs4.json", tmp_path / "report.json"
    before = open(rs["data"], "rb").read()
    code = filter_tool.main(["--data", rs["data"], "--out", str(out), "--keep", "NWPU", "RSICD", "LR", "DOTA",
                             "--image-folder", rs["image_folder"], "--report", str(report)])
    assert code == 0
    kept = json.load(open(out))
    assert len(kept) == 9
    assert {s["source"] for s in kept} == {"NWPU", "RSICD", "LR", "DOTA"}
    assert all(s["image"].startswith(s["source"] + "/") for s in kept)
    data = json.load(open(report))
    assert data["kept"] == 9 and data["dropped"] == 4
    assert data["per_source"]["UAV"] == {"kept": 0, "dropped": 2, "missing_images": 0}
    assert data["per_source"]["RSICD"] == {"kept": 3, "dropped": 0, "missing_images": 0}
    assert data["per_source"]["NWPU"] == {"kept": 2, "dropped": 0, "missing_images": 1}
    assert data["missing_images"] == [{"id": "nwpu-1", "source": "NWPU", "image": "NWPU/NWPU_images/nwpu_1.jpg"}]
    assert "sample 'nwpu-1'" in capsys.readouterr().out
    assert open(rs["data"], "rb").read() == before
    assert "source" not in json.load(open(rs["data"]))[0]


def test_prepare_has_the_rs_defaults_and_can_drop_missing_images(rs, tmp_path):
    out = tmp_path / "dataset.json"
    assert prepare.main(["--data", rs["data"], "--out", str(out), "--image-folder", rs["image_folder"],
                         "--drop-missing-images"]) == 0
    kept = json.load(open(out))
    assert len(kept) == 8
    assert "nwpu-1" not in {s["id"] for s in kept}
    assert {s["source"] for s in kept} == set(prepare.RS_SOURCES)


def test_drop_mode_and_unknown_sources(rs, tmp_path, capsys):
    samples = json.load(open(rs["data"])) + [{"id": "text", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    result = filter_samples(samples, SourceRule.parse("prefix"), drop=["UAV", "UCM"])
    assert len(result.kept) == 10  # 9 RS samples + the text-only one (source unknown, not dropped)
    assert result.dropped_per_source == {"UAV": 2, "UCM": 2}
    assert result.kept_per_source["(unknown)"] == 1
    assert "source" not in result.kept[-1]
    kept_only_known = filter_samples(samples, SourceRule.parse("prefix"), keep=["RSICD"])
    assert [d["id"] for d in kept_only_known.dropped if d["source"] == "(unknown)"] == ["text"]
    # A --keep name that matches nothing is pointed out (typos otherwise silently drop everything).
    out = tmp_path / "o.json"
    assert filter_tool.main(["--data", rs["data"], "--out", str(out), "--keep", "rsicd", "RSICD"]) == 0
    assert "no sample has source rsicd" in capsys.readouterr().out


def test_field_and_regex_rules():
    samples = [{"id": "a", "image": "RSICD/images/x_1.jpg", "dataset": "rsicd", "conversations": []},
               {"id": "b", "image": "all/nwpu_airport_2.jpg", "dataset": "nwpu", "conversations": []},
               {"id": "c", "image": "all/dota_3.jpg", "conversations": []}]
    by_field = filter_samples(samples, SourceRule.parse("field:dataset"), keep=["nwpu"])
    assert [s["id"] for s in by_field.kept] == ["b"] and by_field.kept[0]["source"] == "nwpu"
    by_regex = filter_samples(samples, SourceRule.parse(r"regex:/(\w+?)_"), keep=["nwpu", "dota"])
    assert [(s["id"], s["source"]) for s in by_regex.kept] == [("b", "nwpu"), ("c", "dota")]
    assert SourceRule.parse("regex:[a-z]+(?=_)").source_of(samples[0]) == "x"  # no group: the whole match
    assert SourceRule.parse("auto").source_of({"source": "S", "image": "A/b.png"}) == "S"
    assert SourceRule.parse("auto").source_of({"image": "A/b.png"}) == "A"


@pytest.mark.parametrize("rule", ["field", "regex:(", "prefix:x", "glob:*"])
def test_bad_rules_are_refused(rule):
    with pytest.raises(filter_tool.DataToolError, match="--source-rule"):
        SourceRule.parse(rule)


def test_refuses_to_overwrite_input(rs, capsys):
    before = open(rs["data"], "rb").read()
    assert filter_tool.main(["--data", rs["data"], "--out", rs["data"], "--keep", "RSICD"]) == 2
    assert "refusing to write" in capsys.readouterr().err
    assert open(rs["data"], "rb").read() == before
