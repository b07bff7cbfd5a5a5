"""The grain pipeline: batch layout, loss mask, exact resume, process shards, mixtures, errors."""
import json

import numpy as np
import pydicom.data
import pytest
from PIL import Image

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline, tokenizer as tok
from medvl_jax.data.errors import DataError, SkipCounter

SENTENCES = [
    "Is there a pleural effusion?", "Yes.", "No.", "Which side?", "Left.", "Right.",
    "How many nodules are there?", "2", "Describe the image.", "Normal chest radiograph.",
    "The heart is enlarged.", "Answer with a letter.", "A B C D", "Compare with prior.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tok.train_bpe_tokenizer(SENTENCES * 20, vocab_size=300)


def _cfg(sources, **kw):
    c = pipeline.default_config()
    c.sources = sources
    c.batch_size = 4
    c.image_size = 16
    c.num_image_tokens = 4
    c.max_length = 48
    c.num_threads = 1
    for k, v in kw.items():
        c[k] = v
    return c


def _write_llava(tmp_path, name, n, answer="Yes.", image="img.png", bad_at=()):
    Image.fromarray((np.arange(20 * 24) % 251).astype(np.uint8).reshape(20, 24)).save(
        tmp_path / "img.png")
    recs = []
    for i in range(n):
        recs.append({"id": f"{name}-{i}", "image": "missing.png" if i in bad_at else image,
                     "conversations": [
                         {"from": "human", "value": f"<image>\nIs there a pleural effusion? {i}"},
                         {"from": "gpt", "value": answer}]})
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return dict(kind="json", weight=1.0, path=str(path))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batch_layout_and_loss_mask(tmp_path, tokenizer):
    cfg = _cfg({"a": _write_llava(tmp_path, "a", 10)})
    batch = next(pipeline.build_iterator(cfg, tokenizer))
    assert batch["tokens"].shape == (4, 48) and batch["tokens"].dtype == np.int32
    assert batch["images"].shape == (4, 1, 16, 16, 1) and batch["images"].dtype == np.float32
    assert batch["image_mask"].all()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for row in range(4):
        toks, m = batch["tokens"][row], batch["input_mask"][row]
        assert (toks[~m] == tokenizer.pad_token_id).all()
        assert (toks == image_id).sum() == 4
        trained = tokenizer.decode(toks[batch["loss_mask"][row] == 1])
        assert trained.startswith("Yes.")  # The answer (plus the end-of-turn marker), only.
        assert "effusion" not in trained
    # Normalised pixels: the PNG's values / 255 resized, then (x - 0.5) / 0.5.
    assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0


def test_resume_is_exact(tmp_path, tokenizer):
    cfg = _cfg({"a": _write_llava(tmp_path, "a", 7), "b": _write_llava(tmp_path, "b", 5)},
               augment=True)
    it = pipeline.build_iterator(cfg, tokenizer)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = pipeline.build_iterator(cfg, tokenizer)
    fresh.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
    assert _same(_take(fresh, 4), expected)
    # And the same config gives the same stream from the start (determinism).
    assert _same(_take(pipeline.build_iterator(cfg, tokenizer), 3),
                 _take(pipeline.build_iterator(cfg, tokenizer), 3))


def test_process_shards_partition_the_global_batch(tmp_path, tokenizer):
    cfg = _cfg({"a": _write_llava(tmp_path, "a", 9)})
    whole = _take(pipeline.build_iterator(cfg, tokenizer), 2)
    shards = [_take(pipeline.build_iterator(cfg, tokenizer, process_index=p, process_count=2), 2)
              for p in range(2)]
    for step in range(2):
        rows = {tuple(r) for r in whole[step]["tokens"]}
        got = [tuple(r) for s in shards for r in s[step]["tokens"]]
        assert len(got) == 4 and set(got) == rows
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.build_dataset(cfg, tokenizer, process_count=3)


def test_mixture_follows_weights(tmp_path, tokenizer):
    a = _write_llava(tmp_path, "a", 13, answer="Yes.")
    b = _write_llava(tmp_path, "b", 11, answer="No.")
    a["weight"], b["weight"] = 3.0, 1.0
    cfg = _cfg({"a": a, "b": b}, batch_size=8)
    yes = tokenizer("Yes.", add_special_tokens=False)["input_ids"][0]
    batches = _take(pipeline.build_iterator(cfg, tokenizer), 25)
    firsts = [r[np.argmax(l == 1)] for bt in batches for r, l in
              zip(bt["tokens"], bt["loss_mask"])]
    frac = np.mean(np.array(firsts) == yes)
    assert 0.68 <= frac <= 0.82, frac


def test_dicom_in_a_conversation(tmp_path, tokenizer):
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    rec = {"id": "ct1", "image": ct, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": "Normal chest radiograph."}]}
    path = tmp_path / "ct.jsonl"
    path.write_text(json.dumps(rec))
    cfg = _cfg({"ct": dict(kind="json", weight=1.0, path=str(path),
                                allow_outside_root=True)}, batch_size=1,
               max_length=64)
    img = next(pipeline.build_iterator(cfg, tokenizer))["images"][0, 0, ..., 0]
    assert img.shape == (16, 16) and np.isfinite(img).all() and img.std() > 0.05


def test_bad_image_errors_or_is_skipped_and_counted(tmp_path, tokenizer):
    src = _write_llava(tmp_path, "a", 6, bad_at=(2,))
    cfg = _cfg({"a": src}, batch_size=2, shuffle=False)
    # The error names the image and the JSONL line that referenced it (line 3: record 2).
    with pytest.raises(DataError, match=r"a\.jsonl:3: .*missing\.png"):
        _take(pipeline.build_iterator(cfg, tokenizer), 3)
    cfg = _cfg({"a": src}, batch_size=2, shuffle=False, skip_bad_examples=True)
    skips = SkipCounter()
    # 8 batches of 2 read the 6 records about three times: one bad record, counted once.
    batches = _take(pipeline.build_iterator(cfg, tokenizer, skips=skips), 8)
    assert len(batches) == 8 and skips.total == 1 and skips.counts == {"missing": 1}
    assert skips.state()["bad_reads"] >= 2
    assert "missing.png" in skips.examples[0] and "a.jsonl:3" in skips.examples[0]


def test_too_long_and_too_many_images(tmp_path, tokenizer):
    cfg = _cfg({"a": _write_llava(tmp_path, "a", 4)}, max_length=10)
    with pytest.raises(DataError) as e:
        next(pipeline.build_iterator(cfg, tokenizer))
    assert e.value.reason == "too_long" and "a-" in str(e.value)
    rec = {"id": "two", "image": ["img.png", "img.png"], "conversations": [
        {"from": "human", "value": "<image><image> Compare with prior."},
        {"from": "gpt", "value": "No."}]}
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps(rec))
    cfg = _cfg({"t": dict(kind="json", weight=1.0, path=str(path))}, batch_size=1)
    with pytest.raises(DataError, match="max_images"):
        next(pipeline.build_iterator(cfg, tokenizer))


def test_placeholder_mismatch_is_an_error(tmp_path, tokenizer):
    _write_llava(tmp_path, "x", 1)
    rec = {"id": "noimg", "image": "img.png", "conversations": [
        {"from": "human", "value": "Is there a pleural effusion?"},
        {"from": "gpt", "value": "No."}]}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rec))
    cfg = _cfg({"p": dict(kind="json", weight=1.0, path=str(path))}, batch_size=1)
    with pytest.raises(DataError) as e:
        next(pipeline.build_iterator(cfg, tokenizer))
    assert e.value.reason == "image_placeholders" and "noimg" in str(e.value)


def test_unknown_source_field_and_kind(tmp_path, tokenizer):
    src = _write_llava(tmp_path, "a", 2)
    with pytest.raises(ValueError, match="imge_root"):
        pipeline.build_dataset(_cfg({"a": {**src, "imge_root": "x"}}), tokenizer)
    with pytest.raises(ValueError, match="kind must be one of"):
        pipeline.build_dataset(_cfg({"a": {**src, "kind": "parquet"}}), tokenizer)


def test_config_override_typo_is_named():
    cfg = config_lib.load_config_file("configs/medsynth_sft.py:smoke")
    with pytest.raises(KeyError, match="data.batch_sise"):
        config_lib.apply_override(cfg, "data.batch_sise", 4)
    with pytest.raises(ValueError, match="expected a int"):
        config_lib.apply_override(cfg, "data.batch_size", "four")
    config_lib.apply_override(cfg, "data.template", "chatml")
    assert cfg.data.template == "chatml"


def test_config_override_sets_a_model_field_the_file_leaves_out():
    """``model.*`` fields at their dataclass default are overridable; typos still fail."""
    from medvl_jax.models import from_config
    from medvl_jax.models.decoder import DecoderConfig

    cfg = config_lib.load_config("configs/medsynth_sft.py:smoke",
                                 [("model.text.qk_norm", True),
                                  ("model.image_bidirectional", True)])
    assert "qk_norm" not in config_lib.load_config_file("configs/medsynth_sft.py:smoke").model.text
    assert cfg.model.text.qk_norm is True and cfg.model.image_bidirectional is True
    vlm = from_config.vlm_config(cfg.model, vocab_size=100, image_token_id=3)
    assert vlm.text.qk_norm is True and DecoderConfig.qk_norm is False
    with pytest.raises(KeyError, match="model.text.qk_nrom"):
        config_lib.load_config("configs/medsynth_sft.py:smoke", [("model.text.qk_nrom", True)])
    with pytest.raises(KeyError, match="data.qk_norm"):
        config_lib.load_config("configs/medsynth_sft.py:smoke", [("data.qk_norm", True)])
