"""VQA scoring: the official answer normalization, soft accuracy, closed/open split, per-group tables,
reference files and input checks."""
import json

import pytest

from eval.score import apply_references, load_references, score_predictions, task_of
from eval.vqa_metrics import (is_closed_question, normalize_vqa_answer, vqa_accuracy, vqa_exact_match,
                              vqa_soft_accuracy)


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),
    ("An apple, a banana", "apple banana"),
    ("1,000", "1000"),
    ("  The LIVER\n", "liver"),
    ("Yes!", "yes"),
    ("none", "0"),
    ("2.5 cm", "2.5 cm"),          # a decimal point survives, a sentence period does not
    ("left-sided", "left sided"),  # glued punctuation becomes a space...
    ("x - ray", "x ray"),          # ...spaced punctuation disappears
    ("dont", "don't"),             # contractions written without the apostrophe are repaired
    ("Isnt it", "isn't it"),
    ("whats that", "what's that"),
    ("don't", "don't"),
])
def test_normalize_vqa_answer_known_cases(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_contractions_with_and_without_apostrophe_match():
    assert vqa_exact_match("dont know", ["Don't know."]) == 1.0
    assert vqa_exact_match("cant", ["can not"]) == 0.0


@pytest.mark.parametrize("matching, expected", [(10, 1.0), (4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)])
def test_soft_accuracy_of_ten_answers(matching, expected):
    refs = ["two"] * matching + ["three"] * (10 - matching)
    assert vqa_soft_accuracy("2", refs) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("2", refs) == pytest.approx(expected, abs=1e-12)


def test_soft_accuracy_leaves_out_annotators_by_position_not_by_text():
    # Identical strings are still different annotators: removing one "2" must keep the other three.
    assert vqa_soft_accuracy("2", ["2", "2", "2", "2"] + ["1"] * 6) == 1.0
    assert vqa_soft_accuracy("2", ["2", "2", "2"] + ["1"] * 7) == pytest.approx(0.9, abs=1e-12)


def test_fewer_than_ten_references_is_exact_match_against_any():
    assert vqa_accuracy("The heart.", ["lung", "heart"]) == 1.0
    assert vqa_accuracy("heart", ["lung", "liver"]) == 0.0
    # One matching reference out of three is a full point here, not 1/3.
    assert vqa_accuracy("yes", ["yes", "no", "no"]) == 1.0


@pytest.mark.parametrize("record, closed", [
    ({"answer_type": "CLOSED", "references": ["left"]}, True),
    ({"answer_type": "yes/no", "references": ["yes"]}, True),
    ({"answer_type": "OPEN", "references": ["yes"]}, False),  # the data set's label wins
    ({"answer_type": "number", "references": ["2"]}, False),
    ({"references": ["Yes."]}, True),
    ({"references": ["no", "No"]}, True),
    ({"references": ["yes", "maybe"]}, False),
    ({"answer_type": "", "references": ["liver"]}, False),
])
def test_closed_or_open(record, closed):
    assert is_closed_question(record) is closed


def _vqa(rid, prediction, references, **extra):
    return {"id": rid, "image": f"{rid}.png", "question": "?", "prediction": prediction,
            "references": references, **extra}


VQA_RECORDS = [
    _vqa("q1", "Yes", ["yes"], answer_type="CLOSED", question_type="presence", source="rad"),
    _vqa("q2", "no", ["yes"], answer_type="CLOSED", question_type="presence", source="rad"),
    _vqa("q3", "Two.", ["2"], answer_type="OPEN", question_type="count", source="slake"),
    _vqa("q4", "the liver", ["Liver"], answer_type="OPEN", question_type="organ", source="slake"),
    _vqa("q5", "kidney", ["spleen"], answer_type="OPEN", question_type="organ", source="slake"),
    _vqa("q6", "2", ["2", "2"] + ["3"] * 8, question_type="count"),  # soft: 0.6, no source
]


def test_vqa_metrics_split_and_tables():
    m = score_predictions(VQA_RECORDS)
    assert m["vqa_accuracy"] == pytest.approx((1 + 0 + 1 + 1 + 0 + 0.6) / 6)
    assert m["closed_accuracy"] == pytest.approx(0.5)
    assert m["open_accuracy"] == pytest.approx((1 + 1 + 0 + 0.6) / 4)
    assert m["per_question_type"] == {
        "count": {"accuracy": pytest.approx(0.8), "n": 2},
        "organ": {"accuracy": pytest.approx(0.5), "n": 2},
        "presence": {"accuracy": pytest.approx(0.5), "n": 2},
    }
    assert m["per_source"] == {"(none)": {"accuracy": pytest.approx(0.6), "n": 1},
                               "rad": {"accuracy": pytest.approx(0.5), "n": 2},
                               "slake": {"accuracy": pytest.approx(2 / 3), "n": 3}}
    assert m["counts"] == {"records": 6, "caption": 0, "vqa": 6, "closed": 2, "open": 4,
                           "soft_accuracy_10_refs": 1, "exact_match": 5}
    assert "Bleu_1" not in m and m["skipped"] == {}


def test_empty_subset_and_missing_fields_give_none_and_empty_tables():
    m = score_predictions([_vqa("a", "liver", ["liver"]), _vqa("b", "heart", ["lung"])])
    assert m["closed_accuracy"] is None and m["open_accuracy"] == 0.5
    assert m["per_question_type"] == {} and m["per_source"] == {}


def test_task_rule():
    assert task_of({"question_type": "caption"}) == "caption"
    assert task_of({"question_type": "Caption"}) == "caption"
    assert task_of({"task": "caption", "question_type": "describe"}) == "caption"
    assert task_of({"question_type": "count"}) == "vqa"
    assert task_of({}) == "vqa"
    assert task_of({"question_type": "caption"}, task="vqa") == "vqa"
    assert task_of({}, task="caption") == "caption"
    # A forced task scores every line that way.
    m = score_predictions([_vqa("c", "a dog", ["a dog"], question_type="caption")], task="vqa")
    assert m["counts"]["vqa"] == 1 and m["vqa_accuracy"] == 1.0


def test_bad_records_are_reported_by_id():
    records = [_vqa("a", "x", ["x"]), _vqa("a", "x", ["x"]), _vqa("b", None, ["x"]), _vqa("c", "x", []),
               _vqa("d", "x", [1, 2])]
    with pytest.raises(ValueError) as err:
        score_predictions(records)
    text = str(err.value)
    assert "'a'): id repeated" in text and "'b'): 'prediction'" in text
    assert "'c'): no references" in text and "'d')" in text and "list of strings" in text
    with pytest.raises(ValueError, match="no predictions"):
        score_predictions([])


def test_reference_map_and_vqa_annotation_files(tmp_path):
    plain = tmp_path / "refs.json"
    plain.write_text(json.dumps({"q2": ["no"], "q3": "two"}))
    vqa = tmp_path / "vqa_annotations.json"
    vqa.write_text(json.dumps({"annotations": [
        {"question_id": 7, "answers": [{"answer": "2", "answer_id": i + 1} for i in range(10)]}]}))

    records = apply_references(VQA_RECORDS[:3], load_references(str(plain)))
    assert [r["references"] for r in records] == [["yes"], ["no"], ["two"]]  # q1 keeps its own
    assert VQA_RECORDS[1]["references"] == ["yes"]  # the caller's records are not modified
    assert score_predictions(VQA_RECORDS[:3])["vqa_accuracy"] == pytest.approx(2 / 3)
    m = score_predictions(VQA_RECORDS[:3], references=load_references(str(plain)))
    assert m["vqa_accuracy"] == 1.0  # q2 is now right
    assert load_references(str(vqa)) == {"7": ["2"] * 10}

    with pytest.raises(ValueError, match="no prediction line matches"):
        apply_references(VQA_RECORDS, {"unrelated-id": ["x"]})
