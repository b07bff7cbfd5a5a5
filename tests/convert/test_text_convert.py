"""CLI round trips for BertModel and SiglipModel: HF dir -> from_hf -> to_hf -> from_pretrained."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax.convert import checkpoint_io, from_hf, to_hf  # noqa: E402
from tests.models.test_text_parity import (TOL, bert_batch, build_bert, build_siglip,  # noqa: E402
                                           hf_bert, hf_siglip, ours_siglip, ours_text)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]


def test_bert_cli_roundtrip(tmp_path):
    hf_dir, ckpt, out = (str(tmp_path / d) for d in ("hf", "ckpt", "out"))
    model = build_bert(hf_dir)
    with open(os.path.join(hf_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(WORDS) + "\n")
    vocab = {w: i for i, w in enumerate(WORDS)}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(hf_dir)

    assert from_hf.main(["--hf_dir", hf_dir, "--out", ckpt]) == 0
    meta = json.load(open(os.path.join(ckpt, "medvl_meta.json")))
    assert meta["family"] == "BertModel" and meta["model_config"]["layout"] == "bert"
    for name in ("vocab.txt", "tokenizer.json"):
        assert (tmp_path / "ckpt" / "tokenizer" / name).exists(), name

    encoder, params, _ = checkpoint_io.load_checkpoint(ckpt)
    ids, mask, types = bert_batch()
    real = mask.astype(bool)
    ref_h, ref_p = hf_bert(model, ids, mask, types)
    h, p = ours_text(encoder.config, params, ids, mask, types)
    assert np.abs(h[real] - ref_h[real]).max() <= TOL and np.abs(p - ref_p).max() <= TOL

    assert to_hf.main(["--checkpoint", ckpt, "--out", out]) == 0
    back = transformers.BertModel.from_pretrained(out).eval()
    back_h, back_p = hf_bert(back, ids, mask, types)
    assert np.abs(back_h[real] - ref_h[real]).max() <= TOL
    assert np.abs(back_p - ref_p).max() <= TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("w3") == WORDS.index("w3")
    assert (tmp_path / "out" / "vocab.txt").exists()
    assert not (tmp_path / "out" / "generation_config.json").exists()


def test_siglip_cli_roundtrip(tmp_path):
    hf_dir, ckpt, out = (str(tmp_path / d) for d in ("hf", "ckpt", "out"))
    model = build_siglip(hf_dir)
    assert from_hf.main(["--hf_dir", hf_dir, "--out", ckpt, "--scan_layers"]) == 0
    two_tower, params, meta = checkpoint_io.load_checkpoint(ckpt)
    assert meta["family"] == "SiglipModel" and two_tower.config.text.scan_layers

    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(2, 99, (2, 64))
    ref = hf_siglip(model, images, ids)
    ours = ours_siglip(two_tower.config, params, images, ids)
    assert max(np.abs(a - b).max() for a, b in zip(ours, ref)) <= TOL

    assert to_hf.main(["--checkpoint", ckpt, "--out", out]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["SiglipModel"]
    back = transformers.AutoModel.from_pretrained(out).eval()
    assert type(back).__name__ == "SiglipModel"
    again = hf_siglip(back, images, ids)
    assert max(np.abs(a - b).max() for a, b in zip(again, ref)) <= TOL
