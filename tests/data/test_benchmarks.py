"""Benchmark readers on tiny fixtures written in each release's own file format."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from medvl_jax.data import benchmarks
from medvl_jax.data.benchmarks import (MC_INSTRUCTION, REPORT_INSTRUCTION, BENCHMARKS,
                                       load_benchmark)
from medvl_jax.data.errors import DataError


def _image(path, value=100, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.full(size, value, np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return str(path)


def test_registry_is_plain_and_complete():
    assert list(BENCHMARKS) == ["vqa_rad", "pmc_vqa", "mmmu_med", "slake", "pathvqa",
                                "omnimedvqa", "med_r1", "iu_xray", "mimic_cxr"]
    for name, b in BENCHMARKS.items():
        assert isinstance(b, benchmarks.Benchmark) and b.name == name
        # MMMU's test answers are not in its release: validation only.
        assert ("test" in b.splits or b.splits == ("validation",)) and callable(b.read)
        assert b.description and "\n" not in b.description
        assert b.source.startswith("https://")


# --------------------------------------------------------------------------------------------
# VQA-RAD.
# --------------------------------------------------------------------------------------------

def _vqa_rad_record(qid, phrase_type, image, question, answer, answer_type, organ="HEAD",
                    qtype="PRES"):
    # Every field of a record of "VQA_RAD Dataset Public.json".
    return {"qid": qid, "phrase_type": phrase_type, "qid_linked_id": f"link-{qid}",
            "image_case_url": "https://medpix.nlm.nih.gov/case?id=x", "image_name": image,
            "image_organ": organ, "evaluation": "not evaluated", "question": question,
            "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "question_type": qtype, "answer": answer, "answer_type": answer_type}


def _vqa_rad(tmp_path, records=None):
    folder = tmp_path / "VQA_RAD Image Folder"
    for name in ("synpic1.jpg", "synpic2.jpg"):
        _image(str(folder / name))
    records = records or [
        _vqa_rad_record(0, "freeform", "synpic1.jpg", "Is there a mass?", "Yes", "CLOSED"),
        _vqa_rad_record(1, "test_freeform", "synpic1.jpg", "Is this an MRI?", "No", "CLOSED"),
        _vqa_rad_record(2, "test_para", "synpic2.jpg", "How many lesions are there?", 4, "OPEN",
                        organ="CHEST", qtype="COUNT"),
        _vqa_rad_record(3, "para", "synpic2.jpg", "Where is the lesion?", "left lobe", "OPEN"),
        _vqa_rad_record(4, "test_freeform", "synpic2.jpg", "Where is the mass?", "pineal region",
                        "OPEN"),
    ]
    return _write_json(tmp_path / "VQA_RAD Dataset Public.json", records)


def test_vqa_rad_split_rule_and_question_types(tmp_path):
    path = _vqa_rad(tmp_path)
    test = load_benchmark("vqa_rad", str(tmp_path), "test")
    assert [ex["id"] for ex in test] == ["1", "2", "4"]
    assert [ex["meta"]["question_type"] for ex in test] == ["closed", "open", "open"]
    ex = test[1]
    # An int answer in the JSON becomes text.
    assert ex["meta"]["answer"] == "4" and ex["messages"][1] == {"role": "assistant",
                                                                 "content": "4"}
    assert ex["messages"][0] == {"role": "user", "content": "<image>\nHow many lesions are there?"}
    assert ex["images"] == [str(tmp_path / "VQA_RAD Image Folder" / "synpic2.jpg")]
    assert os.path.isabs(ex["images"][0])
    meta = ex["meta"]
    assert meta["benchmark"] == "vqa_rad" and meta["options"] == []
    assert meta["phrase_type"] == "test_para" and meta["answer_type"] == "OPEN"
    assert meta["organ"] == "CHEST" and meta["category"] == "COUNT"
    assert meta["where"] == f"{path}[2]"
    assert "modality" not in meta  # VQA-RAD does not say.
    train = load_benchmark("vqa_rad", str(tmp_path), "train")
    assert [ex["id"] for ex in train] == ["0", "3"]
    assert [ex["meta"]["question_type"] for ex in train] == ["closed", "open"]
    assert [ex["id"] for ex in load_benchmark("vqa_rad", str(tmp_path), limit=2)] == ["1", "2"]
    assert load_benchmark("vqa_rad", str(tmp_path)) == test  # Deterministic.


def test_vqa_rad_repeated_qid_gets_suffix(tmp_path):
    _vqa_rad(tmp_path, [
        _vqa_rad_record(7, "test_freeform", "synpic1.jpg", "Is it normal?", "yes", "CLOSED"),
        _vqa_rad_record(7, "test_para", "synpic1.jpg", "Is this normal?", "yes", "CLOSED ")])
    exs = load_benchmark("vqa_rad", str(tmp_path))
    assert [ex["id"] for ex in exs] == ["7", "7#2"]
    assert exs[1]["meta"]["question_type"] == "closed"


def test_vqa_rad_errors(tmp_path):
    with pytest.raises(DataError) as e:
        load_benchmark("vqa_rad", str(tmp_path))
    msg = str(e.value)
    assert "VQA_RAD Dataset Public.json" in msg and "https://osf.io/89kps/" in msg
    assert e.value.reason == "missing"

    recs = [_vqa_rad_record(0, "test_freeform", "synpic1.jpg", "Q?", "yes", "CLOSED"),
            _vqa_rad_record(1, "test_freeform", "synpic1.jpg", "Q?", "yes", "CLOSED")]
    del recs[1]["answer"]
    path = _vqa_rad(tmp_path, recs)
    with pytest.raises(DataError, match="'answer'") as e:
        load_benchmark("vqa_rad", str(tmp_path))
    assert e.value.where == f"{path}[1]" and str(path) in str(e.value)

    path = _vqa_rad(tmp_path, [_vqa_rad_record(0, "other", "synpic1.jpg", "Q?", "yes", "OPEN")])
    with pytest.raises(DataError, match="phrase_type 'other'"):
        load_benchmark("vqa_rad", str(tmp_path))
    _vqa_rad(tmp_path, [_vqa_rad_record(0, "freeform", "synpic1.jpg", "Q?", "yes", "MAYBE")])
    with pytest.raises(DataError, match="neither CLOSED nor OPEN"):
        load_benchmark("vqa_rad", str(tmp_path), "train")

    _vqa_rad(tmp_path, [
        _vqa_rad_record(0, "test_para", "gone.jpg", "Q?", "yes", "CLOSED"),
        _vqa_rad_record(1, "test_para", "gone2.jpg", "Q?", "yes", "CLOSED")])
    with pytest.raises(DataError) as e:
        load_benchmark("vqa_rad", str(tmp_path))
    assert e.value.reason == "missing_image"
    assert str(tmp_path / "VQA_RAD Image Folder" / "gone.jpg") in str(e.value)
    assert "1 more" in str(e.value)
    # limit checks only the images of the examples it keeps.
    os.remove(tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg")
    _vqa_rad(tmp_path, [
        _vqa_rad_record(0, "test_para", "synpic2.jpg", "Q?", "yes", "CLOSED"),
        _vqa_rad_record(1, "test_para", "gone.jpg", "Q?", "yes", "CLOSED")])
    assert len(load_benchmark("vqa_rad", str(tmp_path), limit=1)) == 1


# --------------------------------------------------------------------------------------------
# SLAKE.
# --------------------------------------------------------------------------------------------

def _slake_record(qid, img_id, question, answer, answer_type, lang="en"):
    # Every field of a record of SLAKE's train/validate/test.json.
    return {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question,
            "answer": answer, "q_lang": lang, "location": "Lung", "modality": "CT",
            "answer_type": answer_type, "base_type": "vqa", "content_type": "Organ",
            "triple": ["vhead", "_", "_"], "qid": qid}


def _slake(tmp_path):
    for img_id in (102, 103):
        _image(str(tmp_path / "imgs" / f"xmlab{img_id}" / "source.jpg"))
    _write_json(tmp_path / "train.json", [_slake_record(1, 102, "Is this a CT?", "Yes", "CLOSED")])
    _write_json(tmp_path / "validate.json",
                [_slake_record(5, 103, "Which organ is shown?", "Lung", "OPEN")])
    return _write_json(tmp_path / "test.json", [
        _slake_record(11, 102, "Does the picture contain the liver?", "No", "CLOSED"),
        _slake_record(12, 102, "图中包含肝脏吗?", "不包含", "CLOSED", lang="zh"),
        _slake_record(13, 103, "What is the largest organ in the picture?", "Lung", "OPEN"),
    ])


def test_slake_english_by_default_and_splits(tmp_path):
    path = _slake(tmp_path)
    test = load_benchmark("slake", str(tmp_path), "test")
    assert [ex["id"] for ex in test] == ["11", "13"]
    assert [ex["meta"]["question_type"] for ex in test] == ["closed", "open"]
    ex = test[0]
    assert ex["images"] == [str(tmp_path / "imgs" / "xmlab102" / "source.jpg")]
    assert ex["messages"][0]["content"] == "<image>\nDoes the picture contain the liver?"
    assert ex["meta"]["answer"] == "No"
    meta = ex["meta"]
    assert (meta["q_lang"], meta["modality"], meta["location"], meta["content_type"]) == (
        "en", "CT", "Lung", "Organ")
    assert meta["where"] == f"{path}[0]" and meta["img_id"] == "102"
    both = load_benchmark("slake", str(tmp_path), "test", include_zh=True)
    assert [ex["id"] for ex in both] == ["11", "12", "13"]
    assert both[1]["meta"]["q_lang"] == "zh" and both[1]["meta"]["answer"] == "不包含"
    for alias in ("validation", "val"):
        assert [ex["id"] for ex in load_benchmark("slake", str(tmp_path), alias)] == ["5"]
    assert [ex["id"] for ex in load_benchmark("slake", str(tmp_path), "train")] == ["1"]


def test_slake_errors(tmp_path):
    _slake(tmp_path)
    os.remove(tmp_path / "test.json")
    with pytest.raises(DataError) as e:
        load_benchmark("slake", str(tmp_path), "test")
    assert str(tmp_path / "test.json") in str(e.value) and "med-vqa.com/slake" in str(e.value)
    recs = [_slake_record(11, 102, "Q?", "No", "CLOSED")]
    del recs[0]["q_lang"]
    path = _write_json(tmp_path / "test.json", recs)
    with pytest.raises(DataError, match="'q_lang'") as e:
        load_benchmark("slake", str(tmp_path), "test")
    assert e.value.where == f"{path}[0]"


# --------------------------------------------------------------------------------------------
# PathVQA (Hugging Face parquet).
# --------------------------------------------------------------------------------------------

def _encoded(arr, fmt):
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _pathvqa(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write the parquet fixture")
    import pyarrow.parquet as pq

    arrays = [np.full((8, 9), v, np.uint8) for v in (10, 20, 30)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    shards = [  # The release's layout: data/<split>-0000i-of-0000n.parquet, image as a struct.
        ("test-00000-of-00002.parquet",
         [(arrays[0], "PNG", "Is there inflammation?", "yes"),
          (arrays[1], "JPEG", "What have lost their nuclei?", "neutrophils")]),
        ("test-00001-of-00002.parquet", [(arrays[2], "PNG", "Is this fibrosis?", "No")]),
    ]
    (tmp_path / "data").mkdir()
    for name, rows in shards:
        table = pa.table({
            "image": pa.array([{"bytes": _encoded(a, fmt), "path": None} for a, fmt, _, _ in rows],
                              type=image_type),
            "question": [q for _, _, q, _ in rows], "answer": [a for _, _, _, a in rows]})
        pq.write_table(table, tmp_path / "data" / name)
    return arrays


def test_pathvqa_parquet(tmp_path):
    arrays = _pathvqa(tmp_path)
    cache = tmp_path / "cache"
    exs = load_benchmark("pathvqa", str(tmp_path), "test", cache_dir=str(cache))
    assert [ex["id"] for ex in exs] == ["test/0", "test/1", "test/2"]
    assert [ex["meta"]["question_type"] for ex in exs] == ["closed", "open", "closed"]
    assert exs[1]["messages"] == [
        {"role": "user", "content": "<image>\nWhat have lost their nuclei?"},
        {"role": "assistant", "content": "neutrophils"}]
    assert exs[2]["meta"]["where"] == f"{tmp_path / 'data' / 'test-00001-of-00002.parquet'}[0]"
    assert exs[0]["meta"]["modality"] == "pathology"
    # Image bytes are written to files under the cache, with the suffix of their format.
    assert [os.path.splitext(ex["images"][0])[1] for ex in exs] == [".png", ".jpg", ".png"]
    for ex in exs:
        assert os.path.isabs(ex["images"][0]) and ex["images"][0].startswith(str(cache))
    np.testing.assert_array_equal(np.asarray(Image.open(exs[0]["images"][0])), arrays[0])
    np.testing.assert_array_equal(np.asarray(Image.open(exs[2]["images"][0])), arrays[2])
    # A second load finds them there.
    mtime = os.path.getmtime(exs[0]["images"][0])
    again = load_benchmark("pathvqa", str(tmp_path), "test", cache_dir=str(cache))
    assert again == exs and os.path.getmtime(again[0]["images"][0]) == mtime


def test_pathvqa_limit_writes_only_its_images(tmp_path):
    _pathvqa(tmp_path)
    cache = tmp_path / "cache"
    exs = load_benchmark("pathvqa", str(tmp_path), "test", limit=1, cache_dir=str(cache))
    assert [ex["id"] for ex in exs] == ["test/0"]
    written = [f for _, _, files in os.walk(cache) for f in files]
    assert written == ["000000.png"]


def test_pathvqa_missing_and_pickle_only(tmp_path):
    with pytest.raises(DataError) as e:
        load_benchmark("pathvqa", str(tmp_path), "test")
    assert "data/test-*.parquet" in str(e.value) and "flaviagiammarino/path-vqa" in str(e.value)
    # The original release's pickles are refused, never opened (this one is not even a pickle).
    (tmp_path / "split" / "qas").mkdir(parents=True)
    (tmp_path / "split" / "qas" / "test_qa.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="never unpickles"):
        load_benchmark("pathvqa", str(tmp_path), "test")


# --------------------------------------------------------------------------------------------
# OmniMedVQA.
# --------------------------------------------------------------------------------------------

def _omni_record(qid, dataset, image, question, answer, options, qtype="Disease Diagnosis",
                 modality_key="modality_type", modality="Fundus Photography"):
    rec = {"dataset": dataset, "question_id": qid, "question_type": qtype,
           "question": question, "gt_answer": answer, "image_path": image,
           modality_key: modality}
    rec.update({f"option_{letter}": o for letter, o in zip("ABCD", options)})
    return rec


def _omnimedvqa(tmp_path):
    root = tmp_path / "OmniMedVQA"  # How the Hugging Face archive unpacks.
    _image(str(root / "Images" / "ACRIMA" / "Im002_ACRIMA.png"))
    _image(str(root / "Images" / "Chest CT Scan" / "test" / "000108 (3).png"))
    qa = root / "QA_information" / "Open-access"
    chest = _write_json(qa / "Chest CT Scan.json", [_omni_record(
        "Chest CT Scan_0001", "Chest CT Scan", "Images/Chest CT Scan/test/000108 (3).png",
        "What imaging modality was used?", "CT", ["MRI", "CT"], qtype="Modality Recognition",
        modality_key="modality", modality="CT(Computed Tomography)")])
    acrima = _write_json(qa / "ACRIMA.json", [
        _omni_record("ACRIMA_0000", "ACRIMA", "Images/ACRIMA/Im002_ACRIMA.png",
                     "What diagnosis best fits this image?", "Glaucoma",
                     ["Cataract", "Glaucoma", "Normal", "Diabetic retinopathy"]),
        _omni_record("ACRIMA_0001", "ACRIMA", "Images/ACRIMA/Im002_ACRIMA.png",
                     "Is there glaucoma?", "no, it's normal.", ["Yes", "No, It's normal."]),
    ])
    return root, acrima, chest


def test_omnimedvqa_multiple_choice(tmp_path):
    root, acrima, chest = _omnimedvqa(tmp_path)
    exs = load_benchmark("omnimedvqa", str(root), "test")
    assert [ex["id"] for ex in exs] == ["ACRIMA_0000", "ACRIMA_0001", "Chest CT Scan_0001"]
    ex = exs[0]
    assert ex["messages"][0]["content"] == (
        "<image>\nWhat diagnosis best fits this image?\nA. Cataract\nB. Glaucoma\nC. Normal\n"
        f"D. Diabetic retinopathy\n{MC_INSTRUCTION}")
    assert ex["messages"][1]["content"] == "B"
    meta = ex["meta"]
    assert meta["question_type"] == "multiple_choice" and meta["answer"] == "B"
    assert meta["options"] == ["Cataract", "Glaucoma", "Normal", "Diabetic retinopathy"]
    assert meta["answer_text"] == "Glaucoma" and meta["dataset"] == "ACRIMA"
    assert meta["category"] == "Disease Diagnosis" and meta["modality"] == "Fundus Photography"
    assert meta["where"] == f"{acrima}[0]" and meta["access"] == "Open-access"
    assert ex["images"] == [str(root / "Images" / "ACRIMA" / "Im002_ACRIMA.png")]
    # Two options; the answer matched case-insensitively.
    assert exs[1]["meta"]["options"] == ["Yes", "No, It's normal."]
    assert exs[1]["meta"]["answer"] == "B" and exs[1]["meta"]["answer_text"] == "No, It's normal."
    # The record that spells the field "modality".
    assert exs[2]["meta"]["modality"] == "CT(Computed Tomography)"
    # The archive's parent directory works too.
    assert load_benchmark("omnimedvqa", str(tmp_path), "test") == exs


def test_omnimedvqa_errors(tmp_path):
    root, acrima, _ = _omnimedvqa(tmp_path)
    recs = json.load(open(acrima))
    recs[1]["gt_answer"] = "Maybe"
    _write_json(acrima, recs)
    with pytest.raises(DataError, match="'Maybe' is none of the options") as e:
        load_benchmark("omnimedvqa", str(root))
    assert e.value.where == f"{acrima}[1]"
    with pytest.raises(DataError, match="Restricted-access") as e:
        load_benchmark("omnimedvqa", str(root), access="restricted")
    assert "foreverbeliever/OmniMedVQA" in str(e.value)
    with pytest.raises(ValueError, match="access must be"):
        load_benchmark("omnimedvqa", str(root), access="everything")


# --------------------------------------------------------------------------------------------
# Med-R1.
# --------------------------------------------------------------------------------------------

_MED_R1_XRAY = [
    {"image": "Images/MIAS/mdb084.png",
     "problem": "What imaging technique is utilized to capture this picture? A)X-ray, B)MRI, "
                "C)Echocardiogram, D)Mammography",
     "solution": "<answer> D </answer>"},
    {"image": "Images/MIAS/mdb196.png",
     "problem": "What type of abnormality is depicted in this image? A)No, It's normal, "
                "B)Degenerative disease, C)Congenital defect, D)Genetic mutation",
     "solution": "<answer> A </answer>"},
]


def _med_r1(tmp_path):
    _image(str(tmp_path / "Images" / "MIAS" / "mdb084.png"))
    _image(str(tmp_path / "Images" / "MIAS" / "mdb196.png"))
    splits = tmp_path / "Splits"
    xray = _write_json(splits / "modality" / "test" / "X-Ray_test.json", _MED_R1_XRAY)
    _write_json(splits / "modality" / "test" / "CT(Computed Tomography)_test.json", [
        {"image": "Images/MIAS/mdb084.png", "problem": "Which organ? A)Liver, B)Lung",
         "solution": "<answer> B </answer>"}])
    _write_json(splits / "modality" / "train" / "X-Ray_train.json", _MED_R1_XRAY[:1])
    _write_json(splits / "question_type" / "test" / "Modality Recognition_test.json",
                _MED_R1_XRAY[:1])
    return xray


def test_med_r1_problems(tmp_path):
    xray = _med_r1(tmp_path)
    exs = load_benchmark("med_r1", str(tmp_path), "test")
    assert [ex["id"] for ex in exs] == ["modality/CT(Computed Tomography)/0",
                                        "modality/X-Ray/0", "modality/X-Ray/1"]
    ex = exs[1]
    assert ex["messages"][0]["content"] == (
        f"<image>\n{_MED_R1_XRAY[0]['problem']}\n{MC_INSTRUCTION}")
    assert ex["messages"][1]["content"] == "D"
    meta = ex["meta"]
    assert meta["question_type"] == "multiple_choice" and meta["answer"] == "D"
    assert meta["options"] == ["X-ray", "MRI", "Echocardiogram", "Mammography"]
    assert meta["answer_text"] == "Mammography" and meta["modality"] == "X-Ray"
    assert meta["where"] == f"{xray}[0]" and meta["benchmark"] == "med_r1"
    assert ex["images"] == [str(tmp_path / "Images" / "MIAS" / "mdb084.png")]
    # An option containing a comma.
    assert exs[2]["meta"]["options"][0] == "No, It's normal"
    assert exs[2]["meta"]["answer_text"] == "No, It's normal"
    assert [ex["id"] for ex in load_benchmark("med_r1", str(tmp_path), "train")] == [
        "modality/X-Ray/0"]
    by_task = load_benchmark("med_r1", str(tmp_path), "test", group="question_type")
    assert [ex["id"] for ex in by_task] == ["question_type/Modality Recognition/0"]
    assert by_task[0]["meta"]["category"] == "Modality Recognition"
    assert "modality" not in by_task[0]["meta"]


def test_med_r1_image_root_and_errors(tmp_path):
    splits = tmp_path / "medr1"
    xray = _write_json(splits / "Splits" / "modality" / "test" / "X-Ray_test.json",
                       _MED_R1_XRAY[:1])
    with pytest.raises(DataError) as e:
        load_benchmark("med_r1", str(splits))
    assert e.value.reason == "missing_image"
    assert str(splits / "Images" / "MIAS" / "mdb084.png") in str(e.value)
    _image(str(tmp_path / "omni" / "Images" / "MIAS" / "mdb084.png"))
    exs = load_benchmark("med_r1", str(splits), image_root=str(tmp_path / "omni"))
    assert exs[0]["images"] == [str(tmp_path / "omni" / "Images" / "MIAS" / "mdb084.png")]

    _write_json(xray, [{**_MED_R1_XRAY[0], "solution": "<answer> E </answer>"}])
    with pytest.raises(DataError, match="not the letter of one of the options") as e:
        load_benchmark("med_r1", str(splits), image_root=str(tmp_path / "omni"))
    assert e.value.where == f"{xray}[0]"
    _write_json(xray, [{"image": "Images/MIAS/mdb084.png", "problem": "Which? A)x, B)y"}])
    with pytest.raises(DataError, match="'solution'") as e:
        load_benchmark("med_r1", str(splits), image_root=str(tmp_path / "omni"))
    assert e.value.where == f"{xray}[0]"
    with pytest.raises(DataError, match="Yuxiang-Lai117/Med-R1"):
        load_benchmark("med_r1", str(tmp_path / "omni"))


def test_inline_options():
    assert benchmarks.inline_options("Q? A)x, B)y z, C)w") == ["x", "y z", "w"]
    assert benchmarks.inline_options("A) 1 B) 2") == ["1", "2"]
    assert benchmarks.inline_options("no options here") == []


# --------------------------------------------------------------------------------------------
# IU-Xray and MIMIC-CXR (R2Gen's annotation.json).
# --------------------------------------------------------------------------------------------

def _iu_record(uid, report, n_images=2, split="test"):
    return {"id": uid, "report": report,
            "image_path": [f"{uid}/{i}.png" for i in range(n_images)], "split": split}


def _iu_xray(tmp_path, test=None):
    records = {
        "train": [_iu_record("CXR1_1_IM-0001", "The heart is normal in size.", split="train")],
        "val": [_iu_record("CXR10_IM-0002", "No acute disease.", split="val")],
        "test": test or [
            _iu_record("CXR2384_IM-0942", "The heart size and pulmonary vascularity appear "
                       "within normal limits. A large hiatal hernia is noted."),
            _iu_record("CXR2926_IM-1328", "Lungs are clear. No pneumothorax.", n_images=1)],
    }
    for recs in records.values():
        for rec in recs:
            for p in rec["image_path"]:
                _image(str(tmp_path / "images" / p))
    return _write_json(tmp_path / "annotation.json", records)


def test_iu_xray_reports(tmp_path):
    path = _iu_xray(tmp_path)
    exs = load_benchmark("iu_xray", str(tmp_path), "test")
    assert [ex["id"] for ex in exs] == ["CXR2384_IM-0942", "CXR2926_IM-1328"]
    ex = exs[0]
    assert ex["images"] == [str(tmp_path / "images" / "CXR2384_IM-0942" / f"{i}.png")
                            for i in range(2)]
    assert ex["messages"][0]["content"] == f"<image>\n<image>\n{REPORT_INSTRUCTION}"
    assert ex["messages"][1]["content"].startswith("The heart size and pulmonary")
    meta = ex["meta"]
    assert meta["question_type"] == "report" and meta["answer"] == ex["messages"][1]["content"]
    assert meta["modality"] == "xray" and meta["options"] == []
    assert meta["where"] == f"{path}[test][0]"
    assert exs[1]["messages"][0]["content"] == f"<image>\n{REPORT_INSTRUCTION}"
    for alias in ("validation", "val"):
        assert [ex["id"] for ex in load_benchmark("iu_xray", str(tmp_path), alias)] == [
            "CXR10_IM-0002"]


def test_iu_xray_errors(tmp_path):
    path = _iu_xray(tmp_path, test=[_iu_record("CXR1_IM-1", "Normal."),
                                    {"id": "CXR2_IM-2", "image_path": ["CXR2_IM-2/0.png"],
                                     "split": "test"}])
    with pytest.raises(DataError, match="'report'") as e:
        load_benchmark("iu_xray", str(tmp_path))
    assert e.value.where == f"{path}[test][1]"
    _write_json(tmp_path / "annotation.json", [{"id": "x"}])
    with pytest.raises(DataError, match="train / val / test"):
        load_benchmark("iu_xray", str(tmp_path))
    os.remove(tmp_path / "annotation.json")
    with pytest.raises(DataError) as e:
        load_benchmark("iu_xray", str(tmp_path))
    assert "annotation.json" in str(e.value) and "cuhksz-nlp/R2Gen" in str(e.value)


@pytest.mark.parametrize("image_folder", ["images", "files"])
def test_mimic_cxr_reports(tmp_path, image_folder):
    rel = "p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    _image(str(tmp_path / image_folder / rel))
    rec = {"id": "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "study_id": 50414267,
           "subject_id": 10000032, "report": "There is no focal consolidation.",
           "image_path": [rel], "split": "test"}
    _write_json(tmp_path / "annotation.json", {"train": [], "val": [], "test": [rec]})
    (ex,) = load_benchmark("mimic_cxr", str(tmp_path), "test")
    assert ex["id"] == rec["id"] and ex["images"] == [str(tmp_path / image_folder / rel)]
    assert ex["meta"]["answer"] == "There is no focal consolidation."
    assert ex["meta"]["study_id"] == "50414267" and "subject_id" not in ex["meta"]
    assert load_benchmark("mimic_cxr", str(tmp_path), "train") == []


# --------------------------------------------------------------------------------------------
# load_benchmark's own checks.
# --------------------------------------------------------------------------------------------

def test_load_benchmark_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'vqarad'") as e:
        load_benchmark("vqarad", str(tmp_path))
    assert all(name in str(e.value) for name in BENCHMARKS)
    with pytest.raises(DataError) as e:
        load_benchmark("slake", None)
    assert "test.json" in str(e.value) and "med-vqa.com/slake" in str(e.value)
    with pytest.raises(DataError, match="not a directory"):
        load_benchmark("iu_xray", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_benchmark("vqa_rad", str(tmp_path), "val")
    with pytest.raises(ValueError, match="unknown option"):
        load_benchmark("vqa_rad", str(tmp_path), include_zh=True)
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("vqa_rad", str(tmp_path), limit=-1)
