"""The Qwen-VL processor against transformers' Qwen2VLImageProcessor, and the token budget."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medvl_jax.data.qwen_processor import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                           QwenImageProcessor, patch_positions, smart_resize)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _rgb(rng, h, w, c=3):
    return (rng.random((h, w, c)) * 255).astype(np.uint8)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    limits = [(56 * 56, 28 * 28 * 1280), (56 * 56, 28 * 28 * 64), (128 * 28 * 28, 28 * 28 * 768)]
    sizes = [(h, w) for h in (1, 13, 14, 42, 70, 97, 224, 511, 1000, 3001)
             for w in (3, 28, 41, 98, 300, 799, 2048)]
    for lo, hi in limits:
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError, match=f"{h}x{w}"):
                    smart_resize(h, w, 28, lo, hi)
                continue
            assert smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("limits", [(56 * 56, 28 * 28 * 64), (56 * 56, 28 * 28 * 1280)])
def test_patches_match_transformers(limits):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    hf = Qwen2VLImageProcessorPil(min_pixels=limits[0], max_pixels=limits[1])
    ours = QwenImageProcessor(min_pixels=limits[0], max_pixels=limits[1])
    rng = np.random.default_rng(0)
    # Square, tall, wide, rounded down/up by smart_resize, below min_pixels, above max_pixels
    # (with the small cap), grayscale and RGBA (composited onto white).
    cases = [(56, 56, 3), (100, 37, 3), (37, 100, 1), (200, 57, 3), (14, 30, 3),
             (300, 420, 3), (41, 43, 4)]
    for h, w, c in cases:
        img = _rgb(rng, h, w, c)
        arr = img[..., 0] if c == 1 else img
        want = hf(images=[Image.fromarray(arr)], return_tensors="np")
        patches, grid = ours.patchify(arr)
        assert [list(grid)] == want["image_grid_thw"].tolist(), (h, w)
        np.testing.assert_allclose(patches, want["pixel_values"], atol=1e-6, rtol=0,
                                   err_msg=f"{h}x{w}x{c}")


def test_positions_match_transformers():
    from transformers.vision_utils import get_vision_position_ids

    grids = [(1, 4, 6), (3, 2, 8), (1, 10, 14)]
    want = get_vision_position_ids(torch.tensor(grids), 2).numpy()
    ours = np.concatenate([patch_positions(*g, 2) for g in grids])
    np.testing.assert_array_equal(ours[:, 1:], want)
    np.testing.assert_array_equal(ours[:, 0], np.concatenate([np.repeat(np.arange(t), h * w)
                                                              for t, h, w in grids]))


def test_volume_patches_hold_their_pixels():
    """Each patch of a 5-slice volume holds the normalised pixels its position names; the
    odd slice count is padded with the last slice; a still image is two equal frames."""
    proc = QwenImageProcessor(min_pixels=28 * 28, max_pixels=56 * 84)
    rng = np.random.default_rng(1)
    vol = (rng.random((5, 56, 84)) * 255).astype(np.uint8)  # sizes that need no resize
    patches, grid = proc.patchify(vol)
    assert grid == (3, 4, 6) and patches.shape == (72, 3 * 2 * 14 * 14)
    frames = np.concatenate([vol, vol[-1:]])[..., None].repeat(3, -1) / 255
    frames = (frames.astype(np.float32) - np.float32(OPENAI_CLIP_MEAN)) / np.float32(
        OPENAI_CLIP_STD)
    for i, (t, h, w) in enumerate(patch_positions(*grid)):
        want = frames[2 * t: 2 * t + 2, 14 * h: 14 * h + 14, 14 * w: 14 * w + 14]
        np.testing.assert_allclose(patches[i], want.transpose(3, 0, 1, 2).reshape(-1),
                                   atol=1e-6)
    still, g1 = proc.patchify(vol[0])
    pair, g2 = proc.patchify(vol[:2] * 0 + vol[:1], video=True)
    assert g1 == g2 == (1, 4, 6)
    np.testing.assert_array_equal(still, pair)
    # Floats in [0, 1] skip the 1/255 scaling (and, needing no resize, are the same pixels).
    np.testing.assert_allclose(proc.patchify(vol[0] / 255.0)[0], still, atol=1e-5)


def test_budget_padding_segments_and_shrinking():
    proc = QwenImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16, visual_tokens=24,
                              max_visuals=3)
    rng = np.random.default_rng(2)
    small, large = _rgb(rng, 56, 56), _rgb(rng, 112, 84)
    # Natural size fits: 4 + 12 tokens, padded to 24.
    ex = proc.example([small, large])
    assert ex["patches"].shape == (96, 1176) and ex["num_visuals"] == 2
    assert ex["grid_thw"].tolist() == [[1, 4, 4], [1, 8, 6], [0, 0, 0]]
    np.testing.assert_array_equal(ex["segment_ids"], [1] * 16 + [2] * 48 + [0] * 32)
    assert not ex["patches"][64:].any() and not ex["positions"][64:].any()
    np.testing.assert_array_equal(ex["positions"][16:64], patch_positions(1, 8, 6))
    # Two large images and a small one (28 tokens) do not fit: all shrink under one pixel cap, the
    # largest that fits; a one-pixel larger cap would not.
    ex = proc.example([large, large, small])
    grids = ex["grid_thw"]
    assert (grids.prod(-1).sum() // 4) <= 24 and grids[2].tolist() == [1, 4, 4]
    _, cap = proc.fit([(1, 112, 84)] * 2 + [(1, 56, 56)], 24)
    assert sum(t * h * w for t, h, w in proc._natural([(1, 112, 84)] * 2 + [(1, 56, 56)],
                                                     cap + 1)) > 96
    with pytest.raises(ValueError, match=r"3 image\(s\)/video\(s\) \(112x84, 112x84, 1000x1000"):
        proc.example([large, large, _rgb(rng, 1000, 1000)[:, :, :3]], budget_tokens=2)
    with pytest.raises(ValueError, match="max_visuals=3"):
        proc.example([small] * 4)
    with pytest.raises(ValueError, match=r"in \[0, 1\].*\[-1000.0, 1.0\]"):
        proc.example([np.linspace(-1000, 1, 56 * 56).reshape(56, 56)])
    with pytest.raises(ValueError, match="nan"):
        proc.example([np.full((56, 56), np.nan, np.float32)])


def test_buckets_pick_the_smallest_that_holds_the_batch():
    proc = QwenImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16, buckets=(32, 8))
    rng = np.random.default_rng(3)
    small, large = _rgb(rng, 56, 56), _rgb(rng, 112, 84)
    assert proc.buckets == (8, 32)
    assert proc.batch([[small], [small, small]])["patches"].shape == (2, 32, 1176)
    out = proc.batch([[small], [large, large]], [[False], None])
    assert out["patches"].shape == (2, 128, 1176) and out["num_visuals"].tolist() == [1, 2]
    assert proc.batch([[], [small]])["segment_ids"][0].sum() == 0  # a text-only row
    with pytest.raises(ValueError, match="not both"):
        QwenImageProcessor(visual_tokens=8, buckets=(8,))
