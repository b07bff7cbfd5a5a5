"""SigLIP and CLIP vision towers against transformers' PyTorch models, both directions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from medvl_jax.convert import hf_io  # noqa: E402
from medvl_jax.convert.vision import load_hf_vision, save_hf_vision  # noqa: E402
from medvl_jax.models.vision import (VisionEncoder, cubic_resize_matrix,  # noqa: E402
                                     inflate_patch_kernel, merge_tokens)

TOL = 1e-4
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8)


def _build(layout: str, path: str):
    torch.manual_seed(0)
    if layout == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval().save_pretrained(path)
    return model


def _hf(model, images: np.ndarray, interpolate: bool = False):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                    interpolate_pos_encoding=interpolate)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _ours(config, params, images):
    tokens, aux = jax.jit(lambda p, x: VisionEncoder(config).apply({"params": p}, x))(
        params, jnp.asarray(images))
    return np.asarray(tokens), np.asarray(aux["pooled"])


@pytest.mark.parametrize("layout", ["siglip", "clip"])
def test_vision_roundtrip_parity(layout, tmp_path):
    model = _build(layout, str(tmp_path / "hf"))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ref_tok, ref_pool = _hf(model, images)
    config, params = load_hf_vision(str(tmp_path / "hf"))
    tok, pool = _ours(config, params, images)
    d_tok, d_pool = np.abs(tok - ref_tok).max(), np.abs(pool - ref_pool).max()
    print(f"{layout}: tokens {d_tok:.2e} pooled {d_pool:.2e}")
    assert d_tok <= TOL and d_pool <= TOL

    save_hf_vision(params, config, str(tmp_path / "out"))
    cls = transformers.SiglipVisionModel if layout == "siglip" else transformers.CLIPVisionModel
    back_tok, back_pool = _hf(cls.from_pretrained(str(tmp_path / "out")).eval(), images)
    assert np.abs(back_tok - tok).max() <= TOL and np.abs(back_pool - pool).max() <= TOL

    config_s, params_s = load_hf_vision(str(tmp_path / "hf"), scan_layers=True)
    save_hf_vision(params_s, config_s, str(tmp_path / "out_s"))
    a, b = (dict(hf_io.iter_checkpoint(str(tmp_path / d))) for d in ("out", "out_s"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    tok_s, _ = _ours(config_s, params_s, images)
    assert np.abs(tok_s - tok).max() <= 1e-5


def test_position_resampling_matches_pytorch_bicubic(tmp_path):
    model = _build("siglip", str(tmp_path))
    images = np.random.default_rng(1).normal(size=(1, 48, 40, 3)).astype(np.float32)
    ref_tok, ref_pool = _hf(model, images, interpolate=True)
    config, params = load_hf_vision(str(tmp_path))
    tok, pool = _ours(config, params, images)
    assert tok.shape == ref_tok.shape == (1, 30, 32)
    assert np.abs(tok - ref_tok).max() <= TOL and np.abs(pool - ref_pool).max() <= TOL
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    want = torch.nn.functional.interpolate(x, size=(7, 3), mode="bicubic", align_corners=False)
    got = cubic_resize_matrix(5, 7) @ x[0, 0].numpy() @ cubic_resize_matrix(5, 3).T
    np.testing.assert_allclose(got, want[0, 0].numpy(), atol=1e-12)


@pytest.mark.parametrize("mode", ["average", "center"])
def test_inflated_tubelets_reproduce_2d_on_static_video(mode, tmp_path):
    import dataclasses

    model = _build("siglip", str(tmp_path))
    image = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32)
    ref_tok, _ = _hf(model, image)
    config, params = load_hf_vision(str(tmp_path))
    cfg3d = dataclasses.replace(config, tubelet=2)
    params3d = dict(params, patch=inflate_patch_kernel(jnp.asarray(params["patch"]), 2, mode))
    video = np.repeat(image[:, None], 4, axis=1)  # 4 equal frames -> 2 tubelets
    tok, aux = VisionEncoder(cfg3d).apply({"params": params3d}, jnp.asarray(video))
    assert aux["grid"] == (2, 4, 4)
    tok = np.asarray(tok).reshape(1, 2, 16, 32)
    for t in range(2):
        # Attention now spans both tubelets, but they are identical, so tokens are unchanged.
        assert np.abs(tok[:, t] - ref_tok).max() <= TOL


def test_merge_tokens_by_hand():
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)  # 4x4 grid, token id as value
    merged = np.asarray(merge_tokens(x, 4, 4, 2))[0, :, :]
    np.testing.assert_array_equal(merged, [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                           [10, 11, 14, 15]])
