"""Sequence packing: packed rows hold the unpacked examples intact, the model sees each packed
example exactly as alone, and the packer's state resumes exactly."""
import numpy as np
import pytest

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline


def _config(pack: bool, batch_size: int = 4):
    c = config_lib.load_config("configs/medsynth_sft.py:smoke", {})
    c.unlock()
    c.data.sources = {"cxr": pipeline.medsynth_source("cxr", num_studies=16),
                      "pairs": pipeline.medsynth_source("longitudinal", num_studies=8)}
    c.data.qa_per_example = 1
    c.data.batch_size = batch_size
    c.data.max_length = 160
    c.data.max_images = 4
    c.data.pack = pack
    c.data.shuffle = False
    return c


@pytest.fixture(scope="module")
def tokenizer():
    return pipeline.make_tokenizer("medsynth")


def _segments(row, image_id, per_image=16):
    """The examples of a packed row: (tokens, loss_mask, mask_ar, positions, images) each."""
    out, img = [], 0
    for s in range(1, row["segment_ids"].max() + 1):
        sel = row["segment_ids"] == s
        tokens = row["tokens"][sel]
        n_img = int((tokens == image_id).sum()) // per_image
        out.append((tokens, row["loss_mask"][sel], row["mask_ar"][sel], row["positions"][sel],
                    row["images"][img:img + n_img]))
        img += n_img
    assert not row["image_mask"][img:].any() and row["image_mask"][:img].all()
    return out


def test_packed_rows_hold_the_unpacked_examples(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    plain = pipeline.build_iterator(_config(False).data, tokenizer)
    examples = []
    for _ in range(6):
        b = next(plain)
        for i in range(len(b["tokens"])):
            n = int(b["input_mask"][i].sum())
            examples.append((b["tokens"][i, :n], b["loss_mask"][i, :n], b["mask_ar"][i, :n],
                             b["images"][i, :int(b["image_mask"][i].sum())]))
    packed = next(pipeline.build_iterator(_config(True).data, tokenizer))
    assert packed["tokens"].shape == (4, 160) and packed["images"].shape[:2] == (4, 4)
    segs = []
    rows = [{k: v[i] for k, v in packed.items()} for i in range(4)]
    for row in rows:
        segs.extend(_segments(row, image_id))
        # Padding is exactly where no segment is.
        np.testing.assert_array_equal(row["input_mask"], row["segment_ids"] > 0)
    # Far more examples than rows: packing fills the rows.
    assert len(segs) >= 8
    for tokens, loss_mask, mask_ar, positions, images in segs:
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))
        # Each segment is one unpacked example (tokens, masks and pixels).
        assert any(len(e[0]) == len(tokens) and (e[0] == tokens).all()
                   and (e[1] == loss_mask).all() and (e[2] == mask_ar).all()
                   and e[3].shape == images.shape and (e[3] == images).all()
                   for e in examples)


def test_packed_example_is_computed_as_if_alone(tokenizer):
    """Logits of each packed segment equal the logits of that example run unpacked, and the
    packed loss (token and example normalisation) equals the loss over the unpacked batch."""
    import jax

    from medvl_jax.tasks import sft

    cfg = _config(True, batch_size=2)
    task = sft.SFTTask(cfg, tokenizer)
    packed = next(pipeline.build_iterator(cfg.data, tokenizer))
    rows = [{k: v[i] for k, v in packed.items()} for i in range(2)]
    segs = [s for row in rows
            for s in _segments(row, tokenizer.convert_tokens_to_ids("<image>"))]
    # The same examples, padded one per row (the unpacked layout).
    L, n = cfg.data.max_length, len(segs)
    plain = {"tokens": np.full((n, L), tokenizer.pad_token_id, np.int32),
             "input_mask": np.zeros((n, L), bool), "mask_ar": np.ones((n, L), np.int32),
             "loss_mask": np.zeros((n, L), np.int32),
             "images": np.zeros((n,) + packed["images"].shape[1:], np.float32),
             "image_mask": np.zeros((n, packed["images"].shape[1]), bool)}
    for i, (tokens, loss_mask, mask_ar, _, images) in enumerate(segs):
        k = len(tokens)
        plain["tokens"][i, :k], plain["input_mask"][i, :k] = tokens, True
        plain["mask_ar"][i, :k], plain["loss_mask"][i, :k] = mask_ar, loss_mask
        plain["images"][i, :len(images)], plain["image_mask"][i, :len(images)] = images, True
    params = task.init(jax.random.key(0), task.dummy_batch(2))
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    logits_packed = np.asarray(task.policy.apply(params, packed))
    logits_plain = np.asarray(task.policy.apply(params, plain))
    i = 0
    for r, row in enumerate(rows):
        for s in range(1, row["segment_ids"].max() + 1):
            sel = row["segment_ids"] == s
            np.testing.assert_allclose(logits_packed[r][sel], logits_plain[i][:sel.sum()],
                                       atol=2e-5, rtol=1e-5)
            i += 1
    for norm in ("token", "example"):
        task.config.unlock()
        task.config.sft.normalise = norm
        lp, _ = task.loss(params, packed, None)
        lu, _ = task.loss(params, plain, None)
        np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)


def test_packed_iterator_resumes_exactly(tokenizer):
    cfg = _config(True).data
    it = pipeline.build_iterator(cfg, tokenizer)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    it2 = pipeline.build_iterator(cfg, tokenizer)
    it2.set_state(state)
    for a in want:
        b = next(it2)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_too_many_images_for_the_row_is_an_error(tokenizer):
    cfg = _config(True).data
    cfg.max_images = 1  # Longitudinal pairs have two images.
    it = pipeline.build_iterator(cfg, tokenizer)
    with pytest.raises(Exception, match="data.max_images"):
        for _ in range(4):
            next(it)


def test_training_with_packing_runs_and_other_tasks_refuse_it(tmp_path):
    import json

    from medvl_jax.train import cli

    argv = ["--config", "configs/medsynth_sft.py:smoke", "--config.data.pack=True",
            "--config.data.qa_per_example=1", "--config.data.max_images=4",
            "--config.train.steps=2", "--config.train.checkpoint_every=2",
            "--config.evals={}"]
    assert cli.main(argv + ["--workdir", str(tmp_path / "sft")]) == 0
    rows = [json.loads(x) for x in open(tmp_path / "sft" / "metrics.jsonl")]
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()
    with pytest.raises(ValueError, match="data.pack"):
        cli.main(["--config", "configs/medsynth_dpo.py:smoke", "--config.data.pack=True",
                  "--workdir", str(tmp_path / "dpo")])
