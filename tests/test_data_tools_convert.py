"""data_tools.convert: VQA JSON/CSV, COCO captions, parquet/arrow with embedded images -> valid LLaVA JSON."""
import csv
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools import convert
from data_tools.testing import distinct_image
from data_tools.validate import validate_samples


def _png(seed):
    buffer = io.BytesIO()
    distinct_image(seed, 32).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(seed):
    buffer = io.BytesIO()
    distinct_image(seed, 32).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_vqa_rad_style_json(tmp_path):
    rows = [  # VQA-RAD's public JSON: image_name, question, answer (sometimes a number), answer_type, qid
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "Yes",
         "answer_type": "CLOSED", "question_type": "PRES"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "How many ribs?", "answer": 12,
         "answer_type": "OPEN", "question_type": "COUNT"},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "Which lobe?", "answer": "  ",
         "answer_type": "OPEN", "question_type": "POS"},
    ]
    src, out, report = tmp_path / "vqa_rad.json", tmp_path / "out.json", tmp_path / "report.json"
    src.write_text(json.dumps(rows))
    assert convert.main(["vqa", "--input", str(src), "--out", str(out), "--image-prefix", "rad",
                         "--id-prefix", "rad-", "--source", "VQA-RAD", "--report", str(report)]) == 0
    records = json.load(open(out))
    assert records[0] == {
        "id": "rad-1", "image": "rad/synpic1.jpg",
        "conversations": [{"from": "human", "value": "<image>\nIs there a fracture?"}, {"from": "gpt", "value": "Yes"}],
        "question_type": "PRES", "answer_type": "closed", "references": ["Yes"], "source": "VQA-RAD", "task": "vqa"}
    assert (records[1]["references"], records[1]["answer_type"]) == (["12"], "open")
    assert len(records) == 2
    assert json.load(open(report))["skipped"] == [{"row": 2, "id": "rad-3", "reason": "empty answer"}]


def test_slake_style_with_where_and_custom_columns(tmp_path):
    rows = [{"qid": 10, "img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Liver",
             "answer_type": "OPEN", "q_lang": "en", "content_type": "Organ"},
            {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "哪个器官?", "answer": "肝",
             "answer_type": "OPEN", "q_lang": "zh", "content_type": "Organ"},
            {"qid": 12, "img_name": "xmlab2/source.jpg", "question": "Is it abnormal?", "answer": "No",
             "answer_type": "CLOSED", "q_lang": "en", "content_type": "Abnormality"}]
    src, out = tmp_path / "slake.json", tmp_path / "out.jsonl"
    src.write_text(json.dumps(rows, ensure_ascii=False))
    assert convert.main(["vqa", "--input", str(src), "--out", str(out), "--where", "q_lang=en",
                         "--question-type-column", "content_type", "--image-prefix", "imgs",
                         "--instruction", "Answer with a single word."]) == 0
    records = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in records] == ["10", "12"]
    assert [r["question_type"] for r in records] == ["Organ", "Abnormality"]
    assert records[1]["image"] == "imgs/xmlab2/source.jpg"
    assert records[1]["conversations"][0]["value"] == "<image>\nIs it abnormal?\nAnswer with a single word."


def test_csv_without_answer_type_infers_it(tmp_path):
    src, out = tmp_path / "pathvqa.csv", tmp_path / "out.json"
    with open(src, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "question", "answer"])
        writer.writerow(["train_0001.jpg", "is this a tumor?", "yes"])
        writer.writerow(["train_0002.jpg", "what is present?", "necrosis"])
    assert convert.main(["vqa", "--input", str(src), "--out", str(out)]) == 0
    records = json.load(open(out))
    assert [(r["id"], r["answer_type"]) for r in records] == [("0", "closed"), ("1", "open")]


def test_vqa_errors_name_the_row_and_column(tmp_path, capsys):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps([{"image": "a.png", "question": "Q?", "answer": "A", "answer_type": "maybe"}]))
    assert convert.main(["vqa", "--input", str(src), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.json: row 0 (sample '0')" in err and "'maybe'" in err and "closed" in err
    src.write_text(json.dumps([{"picture": "a.png", "question": "Q?", "answer": "A"}]))
    assert convert.main(["vqa", "--input", str(src), "--out", str(tmp_path / "o.json")]) == 2
    assert "no image column" in capsys.readouterr().err
    assert convert.main(["vqa", "--input", str(src), "--out", str(src)]) == 2  # never writes over its input


COCO = {
    "images": [{"id": 1, "file_name": "COCO_val_1.jpg"}, {"id": 2, "file_name": "COCO_val_2.jpg"},
               {"id": 3, "file_name": "COCO_val_3.jpg"}],
    "annotations": [{"id": 11, "image_id": 1, "caption": "A dog on a couch. "},
                    {"id": 12, "image_id": 1, "caption": "A brown dog resting."},
                    {"id": 21, "image_id": 2, "caption": "Two planes in the sky."},
                    {"id": 99, "image_id": 42, "caption": "Orphan caption."}],
}


@pytest.mark.parametrize("mode, expected_ids", [("per-image", ["1", "2"]), ("per-caption", ["1-11", "1-12", "2-21"])])
def test_coco_captions(tmp_path, mode, expected_ids):
    src, out, report = tmp_path / "captions.json", tmp_path / "out.json", tmp_path / "r.json"
    src.write_text(json.dumps(COCO))
    assert convert.main(["coco", "--input", str(src), "--out", str(out), "--caption-mode", mode,
                         "--image-prefix", "val2014", "--report", str(report)]) == 0
    records = json.load(open(out))
    assert [r["id"] for r in records] == expected_ids
    first = records[0]
    assert first["image"] == "val2014/COCO_val_1.jpg"
    assert first["conversations"][0]["value"] == "<image>\n" + convert.CAPTION_PROMPT
    assert first["conversations"][1]["value"] == "A dog on a couch."
    assert first["references"] == ["A dog on a couch.", "A brown dog resting."]
    assert (first["question_type"], first["answer_type"]) == ("caption", "open")
    if mode == "per-caption":
        assert records[1]["conversations"][1]["value"] == "A brown dog resting."
    skipped = json.load(open(report))["skipped"]
    assert {"annotation": 99, "reason": "unknown image_id 42"} in skipped
    assert {"image": "COCO_val_3.jpg", "reason": "no caption"} in skipped


def _vqa_table():
    shared = _png(1)
    return pa.table({
        "image": [{"bytes": shared, "path": "scan_a.png"}, {"bytes": shared, "path": "scan_a.png"},
                  {"bytes": _jpeg(2), "path": None}, {"bytes": _png(3), "path": "scan_a.png"}, None],
        "question": ["is it normal?", "what organ?", "what is shown?", "any lesion?", "no image?"],
        "answer": ["yes", "lung", "a heart", "no", "x"],
    })


def test_parquet_with_embedded_images(tmp_path):
    src, out, folder = tmp_path / "train-00000-of-00001.parquet", tmp_path / "out.json", tmp_path / "data"
    table = _vqa_table()
    pq.write_table(table, src)
    assert convert.main(["parquet", "--input", str(src), "--out", str(out), "--image-folder", str(folder),
                         "--image-subdir", "pathvqa", "--id-prefix", "pv-"]) == 0
    records = json.load(open(out))
    assert [r["id"] for r in records] == ["pv-0", "pv-1", "pv-2", "pv-3"]  # the row without an image is skipped
    images = [r["image"] for r in records]
    assert images[0] == images[1] == "pathvqa/scan_a.png"  # identical bytes: written once, shared
    sha_named = images[2]
    assert sha_named.startswith("pathvqa/") and sha_named.endswith(".jpg")  # no name: content hash + sniffed type
    assert images[3].startswith("pathvqa/scan_a-") and images[3].endswith(".png")  # same name, other bytes
    assert sorted(os.listdir(folder / "pathvqa")) == sorted(os.path.basename(p) for p in set(images))
    cells = table.column("image").to_pylist()
    for record, cell in zip(records, cells):
        assert open(folder / record["image"], "rb").read() == cell["bytes"]  # written unchanged
    assert [r["answer_type"] for r in records] == ["closed", "open", "open", "closed"]
    assert validate_samples(records, str(folder)).errors == []


def test_arrow_stream_caption_set(tmp_path):
    """HF `save_to_disk` writes arrow IPC streams; a caption column holding lists gives per-image records."""
    table = pa.table({"image": [{"bytes": _png(5), "path": "a.png"}, {"bytes": _png(6), "path": "b.png"}],
                      "sentences": [["A field.", "Green crops."], ["A harbour."]],
                      "imgid": [5, 6]})
    src = tmp_path / "data-00000-of-00001.arrow"
    with pa.OSFile(str(src), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    out = tmp_path / "captions.json"
    assert convert.main(["parquet", "--input", str(src), "--out", str(out), "--image-folder", str(tmp_path / "img"),
                         "--id-column", "imgid", "--caption-mode", "per-caption", "--source", "UCM"]) == 0
    records = json.load(open(out))
    assert [r["id"] for r in records] == ["5-0", "5-1", "6-0"]
    assert records[1]["references"] == ["A field.", "Green crops."]
    assert {r["source"] for r in records} == {"UCM"}
    assert validate_samples(records, str(tmp_path / "img")).errors == []


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_imagefolder_one_closed_question_per_image_with_its_class(tmp_path):
    root = tmp_path / "photos"
    for seed, (name, files) in enumerate({"Pullover": ["a.png", "b.png"], "Sandal": ["c.png"]}.items()):
        (root / name).mkdir(parents=True)
        for i, file in enumerate(files):
            distinct_image(seed * 10 + i, 16).save(root / name / file)
    (root / "Sandal" / "notes.txt").write_text("not an image")
    out, report = tmp_path / "photos.json", tmp_path / "report.json"
    assert convert.main(["imagefolder", "--input", str(root), "--out", str(out), "--report", str(report),
                         "--question", "Which garment is this?"]) == 0
    records = json.load(open(out))
    assert [(r["id"], r["image"], r["label"], r["answer_type"]) for r in records] == [
        ("Pullover/a", "Pullover/a.png", "Pullover", "closed"), ("Pullover/b", "Pullover/b.png", "Pullover", "closed"),
        ("Sandal/c", "Sandal/c.png", "Sandal", "closed")]
    assert records[0]["conversations"] == [{"from": "human", "value": "<image>\nWhich garment is this?"},
                                           {"from": "gpt", "value": "Pullover"}]
    data = json.load(open(report))
    assert data["classes"] == ["Pullover", "Sandal"]
    # labelled as questions: eval.score scores them as VQA only, not also as captions (BLEU of class names)
    from eval.score import score_predictions

    metrics = score_predictions([{"id": r["id"], "prediction": r["references"][0], "references": r["references"],
                                  **{k: v for k, v in r.items() if k in ("task", "answer_type", "label")}}
                                 for r in records])
    assert metrics["counts"]["caption"] == 0 and "task_unlabelled" not in metrics and metrics["vqa_accuracy"] == 1.0
    assert data["skipped"] == [{"file": "Sandal/notes.txt", "reason": "not an image file (by its extension)"}]
    assert validate_samples(records, str(root)).errors == []


def test_captions_from_two_columns_or_one_row_per_caption_keep_other_columns(tmp_path):
    two_columns = _write_csv(tmp_path / "wide.csv", ["Image", "Caption", "caption_2", "Artist"],
                             [["frog.png", "A green frog.", "A frog stamp.", "Ann"], ["coin.png", "A coin.", "", "Bo"]])
    out = tmp_path / "wide.json"
    assert convert.main(["captions", "--input", two_columns, "--out", str(out), "--image-prefix", "stamps",
                         "--caption-column", "caption", "CAPTION_2"]) == 0
    wide = json.load(open(out))
    assert [(r["id"], r["image"], r["references"], r["Artist"]) for r in wide] == [
        ("0", "stamps/frog.png", ["A green frog.", "A frog stamp."], "Ann"), ("1", "stamps/coin.png", ["A coin."], "Bo")]
    assert {(r["question_type"], r["answer_type"]) for r in wide} == {("caption", "open")}
    long = _write_csv(tmp_path / "long.csv", ["file_name", "text"],
                      [["frog.png", "A green frog."], ["coin.png", "A coin."], ["frog.png", "A frog stamp."]])
    out = tmp_path / "long.json"
    assert convert.main(["captions", "--input", long, "--out", str(out), "--caption-mode", "per-caption"]) == 0
    per_caption = json.load(open(out))
    assert [(r["id"], r["conversations"][1]["value"]) for r in per_caption] == [
        ("0-0", "A green frog."), ("0-1", "A frog stamp."), ("1-0", "A coin.")]
    assert per_caption[1]["references"] == ["A green frog.", "A frog stamp."]


def test_case_insensitive_columns_extra_columns_and_closed_set_inference(tmp_path):
    classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"]
    rows = [[f"{i}.png", "What is shown?", classes[i % 5], classes[i % 5].lower(), "x"] for i in range(20)]
    rows += [["20.png", "Describe the scene.", "A coat on a chair.", "coat", "y"],
             ["21.png", "Is it a coat?", "yes", "coat", "y"]]
    src = _write_csv(tmp_path / "fashion.csv", ["IMAGE", "Question", "Answer", "label", "batch"], rows)
    out = tmp_path / "fashion.json"
    assert convert.main(["vqa", "--input", src, "--out", str(out)]) == 0
    records = json.load(open(out))
    types = {r["conversations"][0]["value"].split("\n")[1]: r["answer_type"] for r in records}
    assert types == {"What is shown?": "closed", "Describe the scene.": "open", "Is it a coat?": "closed"}
    assert (records[0]["label"], records[0]["batch"]) == ("t-shirt", "x")  # the row's other columns, kept
    assert "IMAGE" not in records[0] and records[0]["image"] == "0.png"
    # Fewer askings than the rule needs: open; --answer-type overrides the rule either way.
    few = tmp_path / "few.json"
    assert convert.main(["vqa", "--input", src, "--out", str(few), "--where", "batch=y"]) == 0
    assert [r["answer_type"] for r in json.load(open(few))] == ["open", "closed"]
    assert convert.main(["vqa", "--input", src, "--out", str(few), "--answer-type", "open"]) == 0
    assert {r["answer_type"] for r in json.load(open(few))} == {"open"}


def test_report_says_why_each_question_got_its_answer_type(tmp_path, capsys):
    rows = [[f"{i}.png", "What is shown?", ["Coat", "Dress", "Sandal"][i % 3]] for i in range(12)]
    rows += [[f"{i}.png", "Describe it.", f"A thing number {i}."] for i in range(12, 22)]  # 10 answers in 10
    rows += [["22.png", "What colour?", "red"], ["23.png", "What colour?", "red"]]  # asked twice only
    rows += [["24.png", "Is it a coat?", "yes"]]
    src = _write_csv(tmp_path / "t.csv", ["image", "question", "answer"], rows)
    report = tmp_path / "report.json"
    assert convert.main(["vqa", "--input", src, "--out", str(tmp_path / "t.json"), "--report", str(report)]) == 0
    reasons = {r["question"]: r for r in json.load(open(report))["answer_type_reasons"]}
    assert list(reasons) == ["What is shown?", "Describe it.", "What colour?", "Is it a coat?"]  # most asked first
    shown = reasons["What is shown?"]
    assert (shown["answer_type"], shown["asked"], shown["distinct_answers"]) == ("closed", 12, 3)
    assert shown["why"].startswith("closed-set rule: asked 12 times, 3 distinct answers (at least 4 askings")
    assert reasons["Describe it."]["answer_type"] == "open"
    assert "10 distinct answers; more than half as many answers as askings" in reasons["Describe it."]["why"]
    assert "asked 2 times, 1 distinct answers; fewer than 4 askings" in reasons["What colour?"]["why"]
    assert reasons["Is it a coat?"]["why"] == "given: yes/no answers are closed"
    printed = capsys.readouterr().out
    assert "  closed: 'What is shown?': closed-set rule: asked 12 times" in printed
    # an answer-type column and --answer-type are named as the reason
    typed = _write_csv(tmp_path / "typed.csv", ["image", "question", "answer", "answer_type"],
                       [["0.png", "Where?", "left", "CLOSED"], ["1.png", "Where?", "right", ""]])
    assert convert.main(["vqa", "--input", typed, "--out", str(tmp_path / "u.json"), "--report", str(report)]) == 0
    (where,) = json.load(open(report))["answer_type_reasons"]
    assert where["answer_type"] == {"closed": 1, "open": 1}  # the empty cell fell to the rule: asked twice
    assert where["why"].endswith("(1 of its records were given a type already)")
    assert convert.main(["vqa", "--input", src, "--out", str(tmp_path / "t.json"), "--report", str(report),
                         "--answer-type", "open"]) == 0
    assert {r["why"] for r in json.load(open(report))["answer_type_reasons"]} == {"--answer-type open"}


def test_imagefolder_and_caption_reports_say_why_too(tmp_path):
    for name in ("Coat", "Sandal"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        distinct_image(len(name)).save(tmp_path / "photos" / name / "a.png")
    report = tmp_path / "report.json"
    assert convert.main(["imagefolder", "--input", str(tmp_path / "photos"), "--out", str(tmp_path / "p.json"),
                         "--report", str(report)]) == 0
    assert json.load(open(report))["answer_type_reasons"] == [
        {"question": "What is in the image?", "answer_type": "closed", "asked": 2, "distinct_answers": 2,
         "why": "imagefolder: the answer is the image's class folder, one of 2 classes"}]
    src = _write_csv(tmp_path / "c.csv", ["image", "caption"], [["a.png", "A coat."], ["b.png", "A sandal."]])
    assert convert.main(["captions", "--input", src, "--out", str(tmp_path / "c.json"), "--report", str(report)]) == 0
    assert [r["why"] for r in json.load(open(report))["answer_type_reasons"]] == ["captions are open"]
