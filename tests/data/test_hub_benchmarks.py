"""Benchmark readers of the Hugging Face hub layouts (parquet with the images inside, written here
with the releases' column names and types) and of PMC-VQA's CSV files."""
import csv
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medvl_jax.data import benchmarks, hub_benchmarks
from medvl_jax.data.errors import DataError
from medvl_jax.evaluate import protocols as P

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_vqa_rad_hub_parquet(tmp_path):
    # flaviagiammarino/vqa-rad: data/test-00000-of-00001-*.parquet, columns image (struct of
    # bytes and path), question, answer; no answer_type.
    os.makedirs(tmp_path / "data")
    table = pa.table({
        "image": pa.array([{"bytes": _jpeg(10), "path": "synpic1.jpg"},
                           {"bytes": _png(20), "path": None},
                           {"bytes": _jpeg(30), "path": "synpic3.jpg"}], IMAGE),
        "question": ["are regions of the brain infarcted?", "where is the lesion?",
                     "is this an mri?"],
        "answer": ["yes", "right frontal lobe", "No"]})
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001-abc.parquet")
    cache = tmp_path / "cache"
    exs = benchmarks.load_benchmark("vqa_rad", str(tmp_path), "test", cache_dir=str(cache))
    assert [e["meta"]["question_type"] for e in exs] == ["closed", "open", "closed"]
    assert [e["id"] for e in exs] == ["test/0", "test/1", "test/2"]
    assert exs[1]["messages"][0]["content"] == "<image>\nwhere is the lesion?"
    assert exs[1]["meta"]["question"] == "where is the lesion?"
    assert exs[1]["meta"]["where"].endswith(".parquet[1]")
    assert np.asarray(Image.open(exs[1]["images"][0]))[0, 0, 0] == 20
    assert exs[0]["images"][0].endswith(".jpg") and exs[1]["images"][0].endswith(".png")
    assert all(str(cache) in e["images"][0] for e in exs)
    # MedEvalKit's prompt and split on these examples.
    p = P.get("medevalkit")
    assert p.prompt(exs[2])["messages"][0]["content"] == (
        "<image>\nis this an mri?\nPlease output 'yes' or 'no'(no extra output).")
    assert [p.category(e) for e in exs] == ["closed", "open", "closed"]
    assert benchmarks.load_benchmark("vqa_rad", str(tmp_path), "test", limit=1,
                                     cache_dir=str(cache))[0]["images"] == exs[0]["images"]
    with pytest.raises(DataError, match="VQA_RAD Dataset Public.json"):
        benchmarks.load_benchmark("vqa_rad", str(tmp_path), "train", cache_dir=str(cache))


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_pmc_vqa_csv_layouts(tmp_path):
    os.makedirs(tmp_path / "figures")
    for name in ("PMC1_F1.jpg", "PMC2_F2.jpg"):
        (tmp_path / "figures" / name).write_bytes(_jpeg(50))
    # test_2.csv as MedEvalKit reads it: index, Figure_path, Caption, Question, Choice A..D,
    # Answer (the letter), split; the options carry their letter.
    _write_csv(tmp_path / "test_2.csv",
               ["", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C",
                "Choice D", "Answer", "split"],
               [["0", "PMC1_F1.jpg", "Fig 1. PET.", "What is the uptake pattern in the breast?",
                 "A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake pattern",
                 "D:Cannot determine from the information given", "B", "test"],
                ["1", "PMC2_F2.jpg", "", "Which imaging modality was used? ", " A:CT scan ",
                 " B:MRI ", " C:Ultrasound ", " D:PET ", "C", "test"]])
    exs = benchmarks.load_benchmark("pmc_vqa", str(tmp_path), "test")
    a, b = exs
    assert a["meta"]["options"] == ["Diffuse uptake pattern", "Focal uptake pattern",
                                    "No uptake pattern",
                                    "Cannot determine from the information given"]
    assert a["meta"]["choices"][0] == "A:Diffuse uptake pattern"
    assert (a["meta"]["answer"], a["meta"]["answer_text"]) == ("B", "Focal uptake pattern")
    assert a["meta"]["caption"] == "Fig 1. PET." and a["id"] == "0"
    assert a["meta"]["where"].endswith("test_2.csv:2")
    assert a["messages"][0]["content"].startswith("<image>\nWhat is the uptake pattern")
    assert a["messages"][0]["content"].endswith("D. Cannot determine from the information "
                                                "given\nAnswer with the letter.")
    assert b["meta"]["question"] == "Which imaging modality was used?"
    # MedEvalKit's prompt lists the options as the CSV writes them; its verdicts (the
    # conformance suite has these responses with the original's verdicts).
    p = P.get("medevalkit")
    assert p.prompt(b)["messages"][0]["content"] == (
        "<image>\n\nQuestion: Which imaging modality was used?\nOptions: \n A:CT scan \n"
        " B:MRI \n C:Ultrasound \n D:PET \n"
        "Answer with the option's letter from the given choices directly.")
    assert p.evaluate("C", b)[1] == 1.0
    assert p.evaluate("Focal uptake pattern", a)[1] == 1.0   # similarity to "b:focal ..."
    assert p.evaluate("(C)", b)[1] == 0.0                    # not read as a letter
    assert P.get("medevalkit_strict").evaluate("(C)", b)[1] == 1.0

    # xmcmic's test.csv: the answer as text and Answer_label.
    _write_csv(tmp_path / "test.csv",
               ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C",
                "Choice D", "Answer_label"],
               [["PMC1_F1.jpg", "What is shown?", "Focal uptake pattern",
                 "A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake", "D:None",
                 "B"]])
    v1 = benchmarks.load_benchmark("pmc_vqa", str(tmp_path), "test", file="test.csv")
    assert v1[0]["meta"]["answer"] == "B" and v1[0]["id"] == "0"


def test_pmc_vqa_errors_name_the_file_and_line(tmp_path):
    os.makedirs(tmp_path / "images")
    (tmp_path / "images" / "x.jpg").write_bytes(_jpeg(1))
    with pytest.raises(DataError, match="test_2.csv, test2.csv, test.csv"):
        benchmarks.load_benchmark("pmc_vqa", str(tmp_path), "test")
    _write_csv(tmp_path / "test_2.csv", ["Figure_path", "Question", "Choice A"],
               [["x.jpg", "q", "A:a"]])
    with pytest.raises(DataError, match="lacks column.*Choice B"):
        benchmarks.load_benchmark("pmc_vqa", str(tmp_path), "test")
    _write_csv(tmp_path / "test_2.csv",
               ["Figure_path", "Question", "Choice A", "Choice B", "Answer"],
               [["x.jpg", "q", "A:a", "B:b", "A"], ["x.jpg", "q", "A:a", "B:b", "zebra"]])
    with pytest.raises(DataError, match=r"test_2.csv:3.*'zebra' is none of the options"):
        benchmarks.load_benchmark("pmc_vqa", str(tmp_path), "test")


def _mmmu_table(rows):
    cols = {"id": pa.string(), "question": pa.string(), "options": pa.string(),
            "explanation": pa.string(), **{f"image_{k}": IMAGE for k in range(1, 8)},
            "img_type": pa.string(), "answer": pa.string(), "topic_difficulty": pa.string(),
            "question_type": pa.string(), "subfield": pa.string()}
    return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in cols.items()})


def test_mmmu_medical_parquet(tmp_path):
    rows = [{"id": "validation_Clinical_Medicine_1",
             "question": "<image 1> Which chamber is marked? <image 2>",
             "options": "['Right Atrium', 'Left Atrium', 'Right Ventricle', 'Left Ventricle']",
             "explanation": "", "image_1": {"bytes": _png(70), "path": None},
             "image_2": {"bytes": _jpeg(80), "path": None}, "img_type": "['Diagrams']",
             "answer": "C", "topic_difficulty": "Easy", "question_type": "multiple-choice",
             "subfield": "Cardiology"},
            {"id": "validation_Clinical_Medicine_2", "question": "Heart rate in bpm?",
             "options": "[]", "explanation": "", "image_1": {"bytes": _png(90), "path": None},
             "img_type": "['ECG']", "answer": "75", "topic_difficulty": "Hard",
             "question_type": "open", "subfield": "Cardiology"}]
    os.makedirs(tmp_path / "Clinical_Medicine")
    pq.write_table(_mmmu_table(rows),
                   tmp_path / "Clinical_Medicine" / "validation-00000-of-00001.parquet")
    exs = benchmarks.load_benchmark("mmmu_med", str(tmp_path), "validation",
                                    subjects=("Clinical_Medicine",),
                                    cache_dir=str(tmp_path / "cache"))
    mc, op = exs
    assert mc["meta"]["question_type"] == "multiple_choice" and mc["meta"]["answer"] == "C"
    assert mc["meta"]["options"][2] == "Right Ventricle"
    assert mc["meta"]["answer_text"] == "Right Ventricle"
    assert mc["meta"]["category"] == "Clinical_Medicine"
    assert len(mc["images"]) == 2 and mc["messages"][0]["content"].startswith(
        "<image>\n<image>\n<image 1> Which chamber")
    assert np.asarray(Image.open(mc["images"][0]))[0, 0, 0] == 70
    assert op["meta"]["question_type"] == "open" and op["meta"]["options"] == []
    assert op["meta"]["answer"] == "75" and len(op["images"]) == 1
    p = P.get("medevalkit")
    assert p.prompt(mc)["messages"][0]["content"] == (
        "<image>\n<image>\n\n<image 1> Which chamber is marked? <image 2>\n\n(A) Right Atrium\n"
        "(B) Left Atrium\n(C) Right Ventricle\n(D) Left Ventricle\n\n\n        "
        "Answer with the option's letter from the given choices directly.")
    assert p.evaluate("(C)", mc)[1] == 1.0
    assert p.evaluate("c", mc)[1] == pytest.approx(0.25)   # lower case: MMMU's random pick
    assert p.evaluate("75", op)[1] == 0.0                   # open questions: never right
    assert P.get("medevalkit_strict").evaluate("The rate is 75.", op)[1] == 1.0
    with pytest.raises(DataError, match="no validation parquet files under Pharmacy/"):
        benchmarks.load_benchmark("mmmu_med", str(tmp_path), "validation",
                                  subjects=("Pharmacy",))
    with pytest.raises(ValueError, match="unknown subject.*Art"):
        benchmarks.load_benchmark("mmmu_med", str(tmp_path), "validation", subjects=("Art",))
    bad = dict(rows[0], options="['a', 'b'", id="x")
    os.makedirs(tmp_path / "Pharmacy")
    pq.write_table(_mmmu_table([bad]), tmp_path / "Pharmacy" / "validation-0.parquet")
    with pytest.raises(DataError, match=r"validation-0.parquet\[0\].*is not a list"):
        hub_benchmarks.read_mmmu_med(str(tmp_path), "validation", None, ("Pharmacy",),
                                     str(tmp_path / "cache"))
