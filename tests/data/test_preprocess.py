"""Preprocessing ops against hand formulas, Pillow and PyTorch references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medvl_jax.data import preprocess as pp
from medvl_jax.data.errors import DataError


def _pil_resize(x: np.ndarray, hw) -> np.ndarray:
    return np.asarray(PILImage.fromarray(x.astype(np.float32), mode="F")
                      .resize((hw[1], hw[0]), PILImage.BILINEAR))


def test_to_float_and_ct_window_formula():
    u8 = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(pp.to_float()(u8, None), [[0.0, 0.2, 1.0]], atol=1e-7)
    hu = np.array([[-1024, -160, 40, 240, 3000]], np.int16)
    f = pp.to_float()(hu, None)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, hu.astype(np.float32))
    np.testing.assert_allclose(pp.to_float(0.5)(hu, None), hu * 0.5)
    out = pp.ct_window(40, 400)(hu, None)
    expected = np.clip((hu.astype(np.float64) - (40 - 400 / 2)) / 400, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-7)
    np.testing.assert_allclose(out, [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-7)
    with pytest.raises(ValueError):
        pp.ct_window(40, 0)


@pytest.mark.parametrize("size", [(16, 20), (80, 90), (37, 20), 24])
def test_resize_matches_pillow(size):
    x = np.random.default_rng(0).random((37, 53)).astype(np.float32)
    hw = (size, size) if isinstance(size, int) else size
    out = pp.resize(size)(x, None)
    assert out.shape == hw and out.dtype == np.float32
    np.testing.assert_allclose(out, _pil_resize(x, hw), atol=1e-5)


def test_resize_rgb_and_volume_in_plane():
    rng = np.random.default_rng(1)
    rgb = rng.random((30, 40, 3)).astype(np.float32)
    out = pp.resize((12, 18))(rgb, None)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], _pil_resize(rgb[..., c], (12, 18)), atol=1e-5)
    vol = rng.random((4, 30, 40)).astype(np.float32)
    out = pp.resize(10)(vol, None)
    assert out.shape == (4, 10, 10)
    for d in range(4):
        np.testing.assert_allclose(out[d], _pil_resize(vol[d], (10, 10)), atol=1e-5)


def test_resize_volume_matches_torch_trilinear():
    v = np.random.default_rng(2).random((5, 6, 7)).astype(np.float32)
    for shape in [(9, 4, 11), (3, 3, 3), (10, 12, 14)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(v)[None, None], size=shape,
                                              mode="trilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(pp.resize_volume(shape)(v, None), ref.numpy(), atol=1e-5)
    with pytest.raises(DataError, match="resize_volume"):
        pp.resize_volume((2, 2, 2))(np.zeros((4, 4), np.float32), None)


def test_pad_to_square():
    x = np.arange(15, dtype=np.float32).reshape(3, 5) + 1
    out = pp.pad_to_square(-1.0)(x, None)
    assert out.shape == (5, 5)
    np.testing.assert_array_equal(out[1:4], x)
    assert np.all(out[[0, 4]] == -1.0)
    tall = np.ones((7, 4, 3), np.float32)
    out = pp.pad_to_square()(tall, None)
    assert out.shape == (7, 7, 3)
    np.testing.assert_array_equal(out[:, 1:5], tall)          # (7-4)=3 → 1 left, 2 right
    assert np.all(out[:, [0, 5, 6]] == 0.0)
    vol = np.ones((2, 4, 6), np.float32)
    out = pp.pad_to_square()(vol, None)
    assert out.shape == (2, 6, 6) and out.sum() == vol.sum()
    np.testing.assert_array_equal(out[:, 1:5], vol)


def test_normalise_formula_and_channels():
    x = np.random.default_rng(3).random((4, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(pp.normalise()(x, None), (x - 0.5) / 0.5, atol=1e-6)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    np.testing.assert_allclose(pp.normalise(mean, std)(x, None),
                               (x - np.array(mean)) / np.array(std), atol=1e-6)
    with pytest.raises(DataError, match="per-channel"):
        pp.normalise((0.1, 0.2), (1.0, 1.0))(x, None)
    with pytest.raises(DataError, match="to_float"):
        pp.normalise()(np.zeros((4, 4), np.uint8), None)


def test_to_channels():
    g = np.random.default_rng(4).random((6, 7)).astype(np.float32)
    out = pp.to_channels(3)(g, None)
    assert out.shape == (6, 7, 3) and all(np.array_equal(out[..., c], g) for c in range(3))
    vol = np.random.default_rng(5).random((2, 6, 7)).astype(np.float32)
    assert pp.to_channels(3)(vol, None).shape == (2, 6, 7, 3)
    rgb = np.random.default_rng(6).random((6, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(pp.to_channels(3)(rgb, None), rgb)
    with pytest.raises(DataError):
        pp.to_channels(3)(np.zeros((6, 7, 4), np.float32), None)


def test_rank_validation():
    with pytest.raises(DataError, match=r"resize.*\(2, 3, 4, 5, 6\)"):
        pp.resize(4)(np.zeros((2, 3, 4, 5, 6), np.float32), None)
    with pytest.raises(DataError, match="augment_volume"):
        pp.augment()(np.zeros((2, 8, 8, 1), np.float32), np.random.default_rng(0))
    with pytest.raises(DataError, match="Generator"):
        pp.augment()(np.zeros((8, 8), np.float32), None)


def test_compose_applies_in_order():
    hu = np.array([[-160, 40, 240]], np.int16)
    op = pp.compose(pp.ct_window(40, 400), pp.pad_to_square(), pp.to_channels(3),
                    pp.normalise(0.5, 0.5))
    out = op(hu, np.random.default_rng(0))
    assert out.shape == (3, 3, 3)
    np.testing.assert_allclose(out[1, :, 0], [-1.0, 0.0, 1.0], atol=1e-6)
    assert np.all(out[[0, 2]] == -1.0)


def _blob(n=32):
    y, x = np.mgrid[:n, :n].astype(np.float64)
    c = (n - 1) / 2
    return np.exp(-((y - c) ** 2 + (x - c) ** 2) / 30.0).astype(np.float32)


def test_augment_deterministic_and_zero_is_identity():
    x = np.random.default_rng(7).random((24, 20)).astype(np.float32)
    aug = pp.augment()
    a = aug(x, np.random.default_rng(123))
    b = aug(x, np.random.default_rng(123))
    c = aug(x, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.dtype == np.float32 and a.shape == x.shape
    zero = pp.augment(brightness=0, contrast=0, noise_std=0, max_shift=0, max_rotate_deg=0)
    np.testing.assert_array_equal(zero(x, np.random.default_rng(0)), x)
    rgb = np.random.default_rng(8).random((12, 10, 3)).astype(np.float32)
    np.testing.assert_array_equal(zero(rgb, np.random.default_rng(0)), rgb)


def test_augment_components():
    x = _blob()
    rng = np.random.default_rng(0)
    # Rotation only: a radially symmetric blob is (nearly) unchanged.
    rot = pp.augment(brightness=0, contrast=0, noise_std=0, max_shift=0, max_rotate_deg=30)
    np.testing.assert_allclose(rot(x, rng), x, atol=0.02)
    # Shift only: the centroid moves by at most max_shift * size per axis.
    shift = pp.augment(brightness=0, contrast=0, noise_std=0, max_shift=0.1, max_rotate_deg=0)
    grid = np.mgrid[:32, :32]
    moved = []
    for seed in range(5):
        out = shift(x, np.random.default_rng(seed))
        cy, cx = [(g * out).sum() / out.sum() - 15.5 for g in grid]
        assert abs(cy) <= 3.2 + 1e-6 and abs(cx) <= 3.2 + 1e-6
        moved.append(abs(cy) + abs(cx))
    assert max(moved) > 0.5
    # Brightness only: a constant offset within ±brightness.
    bright = pp.augment(brightness=0.3, contrast=0, noise_std=0, max_shift=0, max_rotate_deg=0)
    d = bright(x, rng) - x
    assert np.ptp(d) < 1e-6 and abs(d.flat[0]) <= 0.3
    # Contrast only: an affine map about the mean with slope in [0.8, 1.2].
    con = pp.augment(brightness=0, contrast=0.2, noise_std=0, max_shift=0, max_rotate_deg=0)
    out = con(x, rng)
    slope, icept = np.polyfit(x.ravel(), out.ravel(), 1)
    assert 0.8 <= slope <= 1.2
    np.testing.assert_allclose(out.mean(), x.mean(), atol=1e-5)


def test_augment_never_mirrors_left_right():
    x = np.zeros((32, 32), np.float32)
    x[8:24, 2:10] = 1.0   # bright block on the left only
    aug = pp.augment(noise_std=0.0)
    for seed in range(10):
        out = aug(x, np.random.default_rng(seed))
        assert out[:, :16].sum() > out[:, 16:].sum() + 50


def test_augment_volume_same_transform_per_slice():
    vol = np.stack([_blob(16) + np.linspace(0, 0.2, 16)[None, :]] * 3)
    aug = pp.augment_volume(noise_std=0.0, max_shift=0.1, max_rotate_deg=10)
    out = aug(vol, np.random.default_rng(3))
    assert out.shape == vol.shape and not np.allclose(out, vol)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    with pytest.raises(DataError, match="augment_volume"):
        aug(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))


def test_ct_windows_stack_one_channel_per_window():
    hu = np.array([[-1024, -160, 40, 240, 3000]], np.int16)
    out = pp.ct_windows([(40, 400), (-600, 1500)])(hu, None)
    assert out.shape == (1, 5, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], [[0.0, 0.0, 0.5, 1.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(out[..., 1], np.clip((hu + 1350.0) / 1500.0, 0, 1), atol=1e-7)
    with pytest.raises(ValueError):
        pp.ct_windows([(40, 400, 1)])


def test_nonfinite_policy():
    x = np.array([[1.0, np.nan], [np.inf, -np.inf]], np.float32)
    with pytest.raises(DataError) as e:
        pp.nonfinite(x, where="scan.nii")
    assert e.value.reason == "nonfinite" and "scan.nii" in str(e.value) and "3 of 4" in str(e.value)
    np.testing.assert_array_equal(pp.nonfinite(x, policy="replace", value=-5.0),
                                  [[1.0, -5.0], [-5.0, -5.0]])
    ints = np.array([1, 2], np.int16)
    assert pp.nonfinite(ints) is ints


def test_resample_to_spacing_identity_and_torch_upsampling():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(4, 5, 6)).astype(np.float32)
    same, sp = pp.resample_to_spacing(vol, (2.0, 1.0, 1.0), (2.0, 1.0, 1.0))
    np.testing.assert_array_equal(same, vol)
    assert sp == (2.0, 1.0, 1.0)
    # Doubling every axis (spacing halved): the grid matches align_corners=False exactly.
    up, _ = pp.resample_to_spacing(vol, (2.0, 1.0, 1.0), (1.0, 0.5, 0.5))
    ref = torch.nn.functional.interpolate(torch.from_numpy(vol)[None, None], size=(8, 10, 12),
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(up, ref, atol=1e-5)
    # Channels ride along.
    rgb, _ = pp.resample_to_spacing(np.stack([vol, 2 * vol], -1), (2.0, 1.0, 1.0),
                                    (1.0, 0.5, 0.5))
    np.testing.assert_allclose(rgb[..., 1], 2 * up, atol=1e-5)
