"""MedSynth through the pipeline, its TFDS build, and the inspection CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest

from medvl_jax.data import medsynth, pipeline, sources
from medvl_jax.data.medsynth_tfds import MedSynthBuilderConfig, build


@pytest.fixture(scope="module")
def tokenizer():
    return pipeline.make_tokenizer("medsynth")


def test_medsynth_tokenizer_covers_the_corpus_compactly(tokenizer):
    text = " ".join(list(medsynth.corpus(20, seed=5)))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids
    assert len(ids) < len(text) / 2.5  # Trained on this kind of text: far fewer tokens than bytes.


def test_longitudinal_pairs_fill_two_image_slots(tokenizer):
    c = pipeline.default_config()
    c.sources = {"pairs": pipeline.medsynth_source("longitudinal", num_studies=8),
                 "cxr": pipeline.medsynth_source("cxr", num_studies=8)}
    c.batch_size, c.max_images, c.image_size, c.num_image_tokens = 8, 2, 32, 4
    batch = next(pipeline.build_iterator(c, tokenizer))
    counts = batch["image_mask"].sum(1)
    assert set(counts.tolist()) <= {1, 2} and 2 in counts.tolist()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    np.testing.assert_array_equal((batch["tokens"] == image_id).sum(1), counts * 4)
    # An empty image slot holds zeros, never a stale image.
    assert not batch["images"][counts == 1][:, 1].any()


def test_ct_volumes(tokenizer):
    c = pipeline.default_config()
    c.sources = {"ct": pipeline.medsynth_source("ct", num_studies=4,
                                                volume_shape=(16, 32, 32))}
    c.batch_size, c.volume_shape, c.num_image_tokens = 2, (8, 16, 16), 4
    batch = next(pipeline.build_iterator(c, tokenizer))
    assert batch["images"].shape == (2, 1, 8, 16, 16, 1)
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    # A 3D image in a 2D pipeline is an error naming the study.
    c.volume_shape = None
    with pytest.raises(Exception, match="ct-"):
        next(pipeline.build_iterator(c, tokenizer))


def test_tfds_build_matches_the_direct_source(tmp_path, tokenizer):
    cfg = MedSynthBuilderConfig(name="cxr_tiny", kind="cxr", num_train=6, num_val=2,
                                num_test=3, image_size=32)
    builder = build(str(tmp_path), cfg)
    assert "tensorflow" not in sys.modules
    src = builder.as_data_source(split="test")
    direct = medsynth.MedSynthSource(medsynth.MedSynthConfig(
        kind="cxr", split="test", num_studies=3, image_size=32))
    rec = src[0]
    by_id = {direct[i]["id"]: direct[i] for i in range(3)}
    ref = by_id[rec["id"].decode()]
    np.testing.assert_array_equal(rec["image"], ref["image"])
    assert json.loads(rec["qa"].decode()) == ref["qa"]
    ex = sources.medsynth_to_example(rec, np.random.default_rng(0))
    assert ex["messages"][1]["content"] in [q["answer"] for q in ref["qa"]]
    ex = sources.medsynth_to_example(rec, np.random.default_rng(0), question_types=("report",))
    assert ex["messages"][1]["content"] == ref["report"]


def test_report_turns():
    """question_types "report": the study's own report answers the report prompt, beside the
    other types asked for; without it no report turn is ever drawn."""
    src = medsynth.MedSynthSource(medsynth.MedSynthConfig(kind="cxr", num_studies=4,
                                                          image_size=32))
    for i in range(4):
        rec = src[i]
        ex = sources.medsynth_to_example(rec, np.random.default_rng(i), qa_per_example=20,
                                         question_types=("closed", "report"))
        asked = [m["content"].removeprefix("<image>\n") for m in ex["messages"][0::2]]
        closed = [q for q in rec["qa"] if q["type"] == "closed"]
        assert len(asked) == len(closed) + 1
        assert sources.REPORT_PROMPTS["cxr"] in asked
        answers = [m["content"] for m in ex["messages"][1::2]]
        assert answers[asked.index(sources.REPORT_PROMPTS["cxr"])] == rec["report"]
        every = sources.medsynth_to_example(rec, np.random.default_rng(i), qa_per_example=50)
        assert sources.REPORT_PROMPTS["cxr"] not in str(every["messages"])


def test_inspect_cli(tmp_path):
    out = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "-m", "medvl_jax.data.inspect", "--config",
         "configs/medsynth_sft.py:smoke", "--num", "2", "--out", str(out),
         "--config.data.image_size=32"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("tokens:") == 6 and "assistant:" in proc.stdout
    from PIL import Image
    assert Image.open(out).size == (4 * 32, 2 * 32)  # 2 + 2 cxr, 2 pairs x 2 images: 8 -> 2 rows.
