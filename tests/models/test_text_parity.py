"""BERT and SigLIP text encoders and the SigLIP two-tower model against transformers."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax.convert import hf_io  # noqa: E402
from medvl_jax.convert import text as text_conv  # noqa: E402
from medvl_jax.convert.mapping import ConversionError  # noqa: E402
from medvl_jax.models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from medvl_jax.models.two_tower import TwoTower, TwoTowerConfig, pairwise_logits  # noqa: E402
from medvl_jax.models.vision import VisionConfig  # noqa: E402

TOL = 1e-4
VOCAB = 99
BERT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=80, type_vocab_size=2)
SIGLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64)
SIGLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, image_size=32, patch_size=8)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def build_bert(path: str, pooler: bool = True):
    """A tiny random BertModel saved at ``path``."""
    torch.manual_seed(0)
    model = _perturb(transformers.BertModel(transformers.BertConfig(**BERT),
                                            add_pooling_layer=pooler))
    model.save_pretrained(path)
    return model


def build_siglip(path: str):
    """A tiny random SiglipModel saved at ``path`` (logit scale/bias set to SigLIP-like values)."""
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(text_config=SIGLIP_TEXT, vision_config=SIGLIP_VISION)
    model = _perturb(transformers.SiglipModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(path)
    return model


def bert_batch(length: int = 72):
    """Two sequences, the second right-padded, with two token-type segments."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, (2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, 50:] = 0
    ids[1, 50:] = 0
    types = np.zeros_like(ids)
    types[:, 30:] = 1
    return ids, mask, types


def hf_bert(model, ids, mask, types):
    """``(last_hidden_state, pooler_output or None)`` of a transformers BertModel."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types))
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return out.last_hidden_state.numpy(), pooled


def ours_text(config, params, ids, mask=None, types=None):
    """Our text encoder's ``(hidden, pooled)`` as numpy."""
    fn = jax.jit(lambda p, *a: TextEncoder(config).apply({"params": p}, *a))
    h, p = fn(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
              None if types is None else jnp.asarray(types))
    return np.asarray(h), np.asarray(p)


def hf_siglip(model, images, ids, mask=None):
    """``(image_embeds, text_embeds, logits_per_image)`` of a transformers SiglipModel."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(
            images.transpose(0, 3, 1, 2)), attention_mask=None if mask is None
            else torch.tensor(mask))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def ours_siglip(config, params, images, ids, mask=None):
    """Our two-tower ``(image_embeds, text_embeds, logits_per_image)`` as numpy."""
    def fn(p, x, t, m):
        img, txt, scale, bias = TwoTower(config).apply({"params": p}, x, t, m)
        return img, txt, pairwise_logits(img, txt, scale, bias)

    out = jax.jit(fn)(params, jnp.asarray(images), jnp.asarray(ids),
                      None if mask is None else jnp.asarray(mask))
    return tuple(np.asarray(o) for o in out)


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_parity_and_export(pooler, tmp_path):
    model = build_bert(str(tmp_path / "hf"), pooler)
    ids, mask, types = bert_batch()
    real = mask.astype(bool)
    ref_h, ref_p = hf_bert(model, ids, mask, types)

    family, config, params = text_conv.load_hf_text(str(tmp_path / "hf"))
    assert family == "BertModel" and config.layout == "bert" and config.pooler == pooler
    h, p = ours_text(config, params, ids, mask, types)
    d_h = _maxdiff(h[real], ref_h[real])
    d_p = _maxdiff(p, ref_p) if pooler else 0.0
    print(f"bert pooler={pooler}: hidden {d_h:.2e} pooled {d_p:.2e}")
    assert d_h <= TOL and d_p <= TOL

    text_conv.save_hf_text(params, config, str(tmp_path / "out"))
    back = transformers.BertModel.from_pretrained(str(tmp_path / "out"),
                                                  add_pooling_layer=pooler).eval()
    back_h, back_p = hf_bert(back, ids, mask, types)
    assert _maxdiff(back_h[real], h[real]) <= TOL
    if pooler:
        assert _maxdiff(back_p, p) <= TOL

    # Scanned layers: same tensors on export, same outputs.
    _, config_s, params_s = text_conv.load_hf_text(str(tmp_path / "hf"), scan_layers=True)
    assert params_s["layers"]["attn"]["q"].shape == (2, 32, 4, 8)
    text_conv.save_hf_text(params_s, config_s, str(tmp_path / "out_s"))
    a, b = (dict(hf_io.iter_checkpoint(str(tmp_path / d))) for d in ("out", "out_s"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    h_s, _ = ours_text(config_s, params_s, ids, mask, types)
    assert _maxdiff(h_s[real], h[real]) <= 1e-5


def test_bert_for_masked_lm_imports_its_encoder(tmp_path):
    torch.manual_seed(0)
    mlm = _perturb(transformers.BertForMaskedLM(transformers.BertConfig(**BERT)))
    mlm.save_pretrained(str(tmp_path))
    family, config, params = text_conv.load_hf_text(str(tmp_path))
    assert family == "BertModel" and not config.pooler
    ids, mask, types = bert_batch()
    real = mask.astype(bool)
    ref_h, _ = hf_bert(mlm.bert, ids, mask, types)
    h, _ = ours_text(config, params, ids, mask, types)
    assert _maxdiff(h[real], ref_h[real]) <= TOL


def test_siglip_parity_and_export(tmp_path):
    model = build_siglip(str(tmp_path / "hf"))
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(2, VOCAB, (3, 64))
    ref = hf_siglip(model, images, ids)

    family, config, params = text_conv.load_hf_text(str(tmp_path / "hf"))
    assert family == "SiglipModel" and isinstance(config, TwoTowerConfig)
    assert sorted(params) == ["logit_bias", "logit_scale", "text", "vision"]
    ours = ours_siglip(config, params, images, ids)
    diffs = [_maxdiff(a, b) for a, b in zip(ours, ref)]
    print("siglip: image_embeds {:.2e} text_embeds {:.2e} logits_per_image {:.2e}".format(*diffs))
    assert max(diffs) <= TOL
    assert np.abs(ref[2]).max() > 1.0  # the logits are not trivially small

    # With an attention mask Hugging Face hides padded keys but still pools the last position.
    mask = np.ones_like(ids)
    mask[1, 40:] = 0
    ref_m = hf_siglip(model, images, ids, mask)
    ours_m = ours_siglip(config, params, images, ids, mask)
    d_m = max(_maxdiff(a, b) for a, b in zip(ours_m, ref_m))
    print(f"siglip with mask: {d_m:.2e}")
    assert d_m <= TOL and _maxdiff(ours_m[1][1], ours[1][1]) > 1e-3

    text_conv.save_hf_text(params, config, str(tmp_path / "out"))
    back = transformers.SiglipModel.from_pretrained(str(tmp_path / "out")).eval()
    again = hf_siglip(back, images, ids)
    assert max(_maxdiff(a, b) for a, b in zip(again, ours)) <= TOL
    # Scanned SigLIP layers are checked by tests/convert/test_text_convert.py.


def test_siglip_text_model_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = _perturb(transformers.SiglipTextModel(transformers.SiglipTextConfig(
        **SIGLIP_TEXT, projection_size=24)))
    model.save_pretrained(str(tmp_path / "hf"))
    ids = np.random.default_rng(2).integers(2, VOCAB, (2, 64))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids))
    family, config, params = text_conv.load_hf_text(str(tmp_path / "hf"))
    assert family == "SiglipTextModel" and config.out_dim == 24
    h, p = ours_text(config, params, ids)
    assert _maxdiff(h, out.last_hidden_state.numpy()) <= TOL
    assert _maxdiff(p, out.pooler_output.numpy()) <= TOL
    text_conv.save_hf_text(params, config, str(tmp_path / "out"))
    back = transformers.SiglipTextModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert _maxdiff(back(input_ids=torch.tensor(ids)).pooler_output.numpy(), p) <= TOL


def test_conversion_errors_name_the_keys(tmp_path):
    build_bert(str(tmp_path / "hf"))
    tensors = dict(hf_io.iter_checkpoint(str(tmp_path / "hf")))
    tensors.pop("encoder.layer.1.output.dense.bias")
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((3, 3), np.float32)
    tensors["encoder.layer.0.extra.weight"] = np.zeros((2,), np.float32)
    hf_io.write_safetensors(str(tmp_path / "hf" / "model.safetensors"),
                            [(k, np.array(v)) for k, v in tensors.items()])
    with pytest.raises(ConversionError) as err:
        text_conv.load_hf_text(str(tmp_path / "hf"))
    msg = str(err.value)
    assert "layers_1/mlp/fc2_bias" in msg and "encoder.layer.0.extra.weight" in msg
    assert "encoder.layer.0.intermediate.dense.weight (3, 3)" in msg


def _random_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)


def test_two_tower_projections_3d_and_logical_axes():
    vision = VisionConfig(layout="siglip", image_size=16, patch_size=8, width=32, depth=1,
                          num_heads=4, mlp_dim=64, tubelet=2, use_head=False)
    text = TextEncoderConfig(layout="bert", vocab_size=VOCAB, max_len=16, width=48, depth=1,
                             num_heads=4, mlp_dim=64, activation="gelu", norm_eps=1e-12,
                             pooler=False)
    config = TwoTowerConfig(vision=vision, text=text, embed_dim=24, image_pool="mean",
                            text_pool="first", logit_init="clip")
    model = TwoTower(config)
    video = jnp.ones((2, 4, 16, 16, 3))
    ids = jnp.ones((3, 10), jnp.int32)
    # Shapes only: compiling every initialiser costs more than the rest of this file.
    boxed = jax.eval_shape(model.init, jax.random.key(0), video, ids)["params"]
    assert sorted(boxed) == ["img_proj", "logit_scale", "text", "txt_proj", "vision"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    params = _random_params(nn.meta.unbox(boxed))
    assert params["img_proj"].shape == (32, 24) and params["txt_proj"].shape == (48, 24)
    img, txt, scale, bias = jax.jit(model.apply)({"params": params}, video, ids,
                                                 jnp.ones((3, 10)))
    assert img.shape == (2, 24) and txt.shape == (3, 24) and bias is None
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(txt), axis=-1), 1.0, rtol=1e-5)

    # Initial temperature / bias (setup creates only these and the projections here).
    logits_of = lambda m: (m.logit_scale, m.logit_bias)  # noqa: E731
    clip = model.init(jax.random.key(0), method=logits_of)["params"]
    assert "logit_bias" not in clip
    np.testing.assert_allclose(float(clip["logit_scale"].value), math.log(1 / 0.07), rtol=1e-6)
    siglip = TwoTower(TwoTowerConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=32, depth=1, num_heads=4,
                            mlp_dim=64, use_head=True),
        text=TextEncoderConfig(vocab_size=VOCAB, max_len=16, width=32, depth=1, num_heads=4,
                               mlp_dim=64)))
    p = siglip.init(jax.random.key(0), method=logits_of)["params"]
    np.testing.assert_allclose(float(p["logit_scale"].value), math.log(10.0), rtol=1e-6)
    assert float(p["logit_bias"].value) == -10.0
    with pytest.raises(ValueError, match="equal widths"):
        TwoTowerConfig(vision=vision, text=text, image_pool="mean", text_pool="first")
