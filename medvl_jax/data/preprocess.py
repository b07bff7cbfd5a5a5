"""Image preprocessing ops, composed in configs as plain Python.

Every op is made by a factory and called as ``op(x, rng) -> np.ndarray``: pure NumPy, float32
out, ``rng`` a ``np.random.Generator`` (only the augmentations draw from it; others accept None).

Layouts: 2D images are [H, W] or [H, W, C] with C in {1, 3, 4}; volumes are [D, H, W] or
[D, H, W, C]. A rank-3 array whose last dimension is 1, 3 or 4 is read as a channels-last 2D
image, any other rank-3 array as a volume. Ops check rank and dtype and raise
:class:`~medvl_jax.data.errors.DataError` naming the op and the shape they got.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from medvl_jax.data.errors import DataError

Op = Callable[[np.ndarray, "np.random.Generator | None"], np.ndarray]

_CHANNELS = (1, 3, 4)


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------

def _check(x, op: str, ranks: Sequence[int], *, allow_int: bool = False) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise DataError(f"{op}: expected a numpy array, got {type(x).__name__}",
                        reason="bad_input")
    if x.ndim not in ranks:
        raise DataError(f"{op}: expected an array of rank {' or '.join(map(str, ranks))}, got "
                        f"shape {x.shape}", reason="bad_rank")
    if np.issubdtype(x.dtype, np.floating):
        return x
    if allow_int and (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        return x
    raise DataError(f"{op}: expected float input, got dtype {x.dtype}"
                    + ("" if allow_int else " (put to_float() first)"), reason="bad_dtype")


def _is_channels_last_2d(x: np.ndarray) -> bool:
    return x.ndim == 3 and x.shape[-1] in _CHANNELS


def _plane_axes(x: np.ndarray) -> tuple[int, int]:
    """The (H, W) axes of a 2D image or of every slice of a volume."""
    if x.ndim == 2 or _is_channels_last_2d(x):
        return 0, 1
    if x.ndim == 3:
        return 1, 2
    return 1, 2  # [D, H, W, C]


def _resample_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """[n_out, n_in] linear-interpolation weights with half-pixel centres.

    Output pixel i samples input coordinate (i + 0.5) * n_in / n_out - 0.5 with a triangle
    kernel; when shrinking with ``antialias`` the kernel is widened by the scale factor (a
    tent/area filter), as Pillow does. Weights are renormalised at the borders, which for
    plain interpolation equals clamping the coordinate to the image.
    """
    scale = n_in / n_out
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * scale  # in input pixel-edge units
    if antialias and scale > 1.0:
        src = np.arange(n_in, dtype=np.float64) + 0.5
        w = np.clip(1.0 - np.abs(src[None, :] - centre[:, None]) / scale, 0.0, None)
        return w / w.sum(axis=1, keepdims=True)
    # Plain interpolation; coordinates outside [0, n_in - 1] clamp to the edge pixel.
    pos = np.clip(centre - 0.5, 0.0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def linear_resize(x: np.ndarray, shape: Sequence[int], *, axes: Sequence[int],
                  antialias: bool) -> np.ndarray:
    """Separable (bi/tri)linear resize of ``x`` along ``axes`` to ``shape`` (float32 out).

    Half-pixel-centre convention (the same as Pillow, ``jax.image.resize`` and PyTorch's
    ``align_corners=False``); ``antialias`` widens the kernel when shrinking.
    """
    out = np.asarray(x, dtype=np.float64)
    for axis, n in zip(axes, shape):
        n_in = out.shape[axis]
        if n_in == n:
            continue
        m = _resample_matrix(n_in, int(n), antialias)
        out = np.moveaxis(np.tensordot(m, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out.astype(np.float32)


def _size2(size: int | Sequence[int], op: str) -> tuple[int, int]:
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(map(int, size))
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"{op}: size must be a positive int or (height, width), got {size}")
    return hw


# --------------------------------------------------------------------------------------------
# Ops.
# --------------------------------------------------------------------------------------------

def compose(*ops: Op) -> Op:
    """Applies ``ops`` left to right, passing the same generator to each."""
    def apply(x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        for op in ops:
            x = op(x, rng)
        return x
    return apply


def to_float(scale: float | None = None) -> Op:
    """Casts to float32 and multiplies by ``scale``.

    With ``scale=None``: uint8 is scaled by 1/255 (to [0, 1]), uint16 by 1/65535, and every
    other dtype (e.g. int16 HU, float) is kept in its units.
    """
    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "to_float", (2, 3, 4), allow_int=True)
        s = scale
        if s is None:
            s = {np.dtype(np.uint8): 1 / 255, np.dtype(np.uint16): 1 / 65535}.get(x.dtype, 1.0)
        return (x.astype(np.float32) * np.float32(s)).astype(np.float32)
    return apply


def ct_window(center: float, width: float) -> Op:
    """HU → [0, 1] by the window (center, width): (x - (center - width / 2)) / width, clipped."""
    if width <= 0:
        raise ValueError(f"ct_window: width must be positive, got {width}")
    lo = float(center) - float(width) / 2.0

    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "ct_window", (2, 3, 4), allow_int=True)
        y = (x.astype(np.float64) - lo) / float(width)
        return np.clip(y, 0.0, 1.0).astype(np.float32)
    return apply


def ct_windows(windows: Sequence[tuple[float, float]]) -> Op:
    """HU → [0, 1] once per window (center, width), stacked as channels: [..., K] for K windows.

    Each channel is :func:`ct_window` of its window (MedGemma-style packing of several CT
    windows into the channels of one image).
    """
    ops = [ct_window(*_window_pair(w, "ct_windows")) for w in windows]
    if not ops:
        raise ValueError("ct_windows: needs at least one (center, width) window")

    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        return np.stack([op(x, None) for op in ops], axis=-1)
    return apply


def _window_pair(w, op: str) -> tuple[float, float]:
    try:
        center, width = (float(v) for v in w)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: a window is (center, width), got {w!r}") from None
    return center, width


NONFINITE_POLICIES = ("error", "replace")


def nonfinite(x: np.ndarray, *, policy: str = "error", value: float = 0.0,
              where: str | None = None) -> np.ndarray:
    """Applies the non-finite policy to ``x`` (NaN, +inf, -inf values).

    ``policy="error"`` raises :class:`DataError` (reason ``nonfinite``) naming ``where`` and
    how many values are not finite; ``"replace"`` puts ``value`` in their place. Integer
    arrays and finite arrays are returned unchanged.
    """
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite policy must be one of {NONFINITE_POLICIES}, got {policy!r}")
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return x
    bad = ~np.isfinite(x)
    n = int(bad.sum())
    if n == 0:
        return x
    if policy == "error":
        raise DataError(f"{n} of {x.size} pixel values are not finite (NaN or inf); set "
                        f"data.nonfinite='replace' (with data.nonfinite_value) to replace them",
                        where=where, reason="nonfinite")
    return np.where(bad, np.asarray(value, dtype=x.dtype), x)


def _interp_matrix(n_in: int, pos: np.ndarray, width: float) -> np.ndarray:
    """[len(pos), n_in] weights of a triangle kernel of half-width ``width`` (in input pixels)
    centred at the input coordinates ``pos`` (clamped to [0, n_in - 1]), rows summing to 1.
    ``width = 1`` is plain linear interpolation."""
    pos = np.clip(np.asarray(pos, dtype=np.float64), 0.0, n_in - 1)
    src = np.arange(n_in, dtype=np.float64)
    w = np.clip(1.0 - np.abs(src[None, :] - pos[:, None]) / width, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def resample_to_spacing(x: np.ndarray, spacing: Sequence[float], target: Sequence[float], *,
                        antialias: bool = True) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resamples a volume [D, H, W] or [D, H, W, C] with voxel ``spacing`` (z, y, x) mm to the
    voxel spacing ``target`` (z, y, x) mm; returns (volume, target spacing).

    Along each axis the output has ``round(n * spacing / target)`` voxels (at least 1) at
    exactly ``target`` apart, centred on the input's field of view: output voxel i samples
    input coordinate (n - 1) / 2 + (i - (m - 1) / 2) * target / spacing, clamped to the
    volume. Linear interpolation; when a spacing grows (fewer voxels) and ``antialias``, the
    triangle kernel is widened by the factor so every input voxel contributes.
    """
    x = _check(x, "resample_to_spacing", (3, 4))
    spacing = tuple(float(s) for s in spacing)
    target = tuple(float(t) for t in target)
    if len(spacing) != 3 or len(target) != 3 or min(spacing + target) <= 0:
        raise ValueError(f"resample_to_spacing: spacing and target must be 3 positive values "
                         f"(z, y, x) mm, got {spacing} and {target}")
    out = np.asarray(x, dtype=np.float64)
    for axis, (s, t) in enumerate(zip(spacing, target)):
        n = out.shape[axis]
        m = max(1, int(round(n * s / t)))
        if m == n and abs(s - t) < 1e-9 * t:
            continue
        step = t / s  # output step in input voxels
        pos = (n - 1) / 2.0 + (np.arange(m, dtype=np.float64) - (m - 1) / 2.0) * step
        width = step if antialias and step > 1.0 else 1.0
        mat = _interp_matrix(n, pos, width)
        out = np.moveaxis(np.tensordot(mat, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out.astype(np.float32), target


def crop_or_pad(shape: Sequence[int], value: float = 0.0) -> Op:
    """Centre-crops or pads (with ``value``) a volume [D, H, W] or [D, H, W, C] to
    ``shape`` = (D, H, W); an odd voxel is cropped or padded at the end."""
    target = tuple(int(s) for s in shape)
    if len(target) != 3 or min(target) < 1:
        raise ValueError(f"crop_or_pad: shape must be 3 positive ints, got {shape}")

    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "crop_or_pad", (3, 4))
        out = x.astype(np.float32)
        for axis, m in enumerate(target):
            n = out.shape[axis]
            if n > m:
                start = (n - m) // 2
                out = np.take(out, np.arange(start, start + m), axis=axis)
            elif n < m:
                pad = [(0, 0)] * out.ndim
                pad[axis] = ((m - n) // 2, m - n - (m - n) // 2)
                out = np.pad(out, pad, constant_values=np.float32(value))
        return out
    return apply


def resize(size: int | tuple[int, int]) -> Op:
    """Bilinear resize of the (H, W) plane to ``size`` (an int means square).

    Shrinking is antialiased (the kernel widens with the scale factor, like Pillow's
    BILINEAR). [H, W], [H, W, C], and volumes [D, H, W] / [D, H, W, C] (every slice) accepted.
    """
    hw = _size2(size, "resize")

    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "resize", (2, 3, 4))
        return linear_resize(x, hw, axes=_plane_axes(x), antialias=True)
    return apply


def resize_volume(shape: tuple[int, int, int], *, antialias: bool = False) -> Op:
    """Trilinear resize of a volume [D, H, W] or [D, H, W, C] to ``shape`` = (D, H, W)."""
    target = tuple(int(s) for s in shape)
    if len(target) != 3 or min(target) < 1:
        raise ValueError(f"resize_volume: shape must be 3 positive ints, got {shape}")

    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "resize_volume", (3, 4))
        return linear_resize(x, target, axes=(0, 1, 2), antialias=antialias)
    return apply


def pad_to_square(value: float = 0.0) -> Op:
    """Pads the (H, W) plane with ``value`` to a square, centred (the odd pixel goes last)."""
    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "pad_to_square", (2, 3, 4))
        ah, aw = _plane_axes(x)
        h, w = x.shape[ah], x.shape[aw]
        n = max(h, w)
        pad = [(0, 0)] * x.ndim
        pad[ah] = ((n - h) // 2, n - h - (n - h) // 2)
        pad[aw] = ((n - w) // 2, n - w - (n - w) // 2)
        return np.pad(x.astype(np.float32), pad, constant_values=np.float32(value))
    return apply


def normalise(mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5) -> Op:
    """(x - mean) / std; sequences apply per channel along the last axis."""
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    if np.any(s == 0):
        raise ValueError(f"normalise: std must be non-zero, got {std}")

    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "normalise", (2, 3, 4, 5))
        for v in (m, s):
            if v.ndim and v.shape[0] not in (1, x.shape[-1]):
                raise DataError(f"normalise: {v.shape[0]} per-channel values for an array of "
                                f"shape {x.shape}", reason="bad_channels")
        return ((x.astype(np.float32) - m) / s).astype(np.float32)
    return apply


def to_channels(c: int = 3) -> Op:
    """Adds a trailing channel axis repeated ``c`` times: [H, W] → [H, W, c], [D, H, W] →
    [D, H, W, c]. Arrays that already have ``c`` channels are kept; one channel is repeated."""
    def apply(x: np.ndarray, rng=None) -> np.ndarray:
        x = _check(x, "to_channels", (2, 3, 4))
        x = x.astype(np.float32)
        if x.ndim == 2 or (x.ndim == 3 and not _is_channels_last_2d(x)):
            return np.repeat(x[..., None], c, axis=-1)
        if x.shape[-1] == c:
            return x
        if x.shape[-1] == 1:
            return np.repeat(x, c, axis=-1)
        raise DataError(f"to_channels: cannot make {c} channels from shape {x.shape}",
                        reason="bad_channels")
    return apply


def _affine_plane(x: np.ndarray, axes: tuple[int, int], angle: float, shift: tuple[float, float],
                  fill: float) -> np.ndarray:
    """Rotates by ``angle`` (radians) about the centre, then shifts by ``shift`` pixels (dy, dx),
    with bilinear sampling; points from outside the image get ``fill``."""
    ah, aw = axes
    h, w = x.shape[ah], x.shape[aw]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    # Inverse map: output (y, x) ← input R^-1 ((y, x) - shift - c) + c.
    dy, dx = yy - shift[0] - cy, xx - shift[1] - cx
    cos, sin = math.cos(angle), math.sin(angle)
    sy = cos * dy + sin * dx + cy
    sx = -sin * dy + cos * dx + cx
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - y0, sx - x0
    plane = np.moveaxis(x, (ah, aw), (0, 1)).astype(np.float64)
    extra = (1,) * (plane.ndim - 2)
    out = np.zeros_like(plane)
    for oy, wy in ((0, 1.0 - fy), (1, fy)):
        for ox, wx in ((0, 1.0 - fx), (1, fx)):
            yi, xi = y0 + oy, x0 + ox
            inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            vals = plane[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
            vals = np.where(inside.reshape(inside.shape + extra), vals, fill)
            out += (wy * wx).reshape(wy.shape + extra) * vals
    return np.moveaxis(out, (0, 1), (ah, aw)).astype(np.float32)


def _augment(x: np.ndarray, rng: np.random.Generator, axes: tuple[int, int], brightness: float,
             contrast: float, noise_std: float, max_shift: float, max_rotate_deg: float,
             fill: float) -> np.ndarray:
    if rng is None:
        raise DataError("augment: needs a np.random.Generator, got None", reason="bad_input")
    out = x.astype(np.float32)
    if max_shift > 0 or max_rotate_deg > 0:
        angle = math.radians(rng.uniform(-max_rotate_deg, max_rotate_deg))
        shift = (rng.uniform(-max_shift, max_shift) * x.shape[axes[0]],
                 rng.uniform(-max_shift, max_shift) * x.shape[axes[1]])
        out = _affine_plane(out, axes, angle, shift, fill)
    if contrast > 0:
        factor = np.float32(rng.uniform(1.0 - contrast, 1.0 + contrast))
        mean = np.float32(out.mean())
        out = (out - mean) * factor + mean
    if brightness > 0:
        out = out + np.float32(rng.uniform(-brightness, brightness))
    if noise_std > 0:
        out = out + rng.normal(0.0, noise_std, size=out.shape).astype(np.float32)
    return out.astype(np.float32)


def augment(*, brightness: float = 0.1, contrast: float = 0.1, noise_std: float = 0.02,
            max_shift: float = 0.05, max_rotate_deg: float = 5.0, fill: float = 0.0) -> Op:
    """Train-time augmentation of a 2D image [H, W] or [H, W, C].

    A small affine (rotation up to ``max_rotate_deg`` about the centre and a shift up to
    ``max_shift`` of the size per axis, bilinear, ``fill`` outside), then contrast (scale about
    the mean by 1 ± ``contrast``), brightness (add ± ``brightness``) and Gaussian noise. Values
    are not clipped. All draws come from ``rng``: the same seed gives the same output, and all
    magnitudes zero is the identity.

    There is deliberately no horizontal flip: flipping swaps the patient's left and right, so
    every answer about laterality ("left lower lobe opacity") would become wrong.
    """
    def apply(x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = _check(x, "augment", (2, 3, 4))
        if x.ndim == 4 or (x.ndim == 3 and not _is_channels_last_2d(x)):
            raise DataError(f"augment: expected a 2D image [H, W] or [H, W, C], got shape "
                            f"{x.shape} (use augment_volume for volumes)", reason="bad_rank")
        return _augment(x, rng, (0, 1), brightness, contrast, noise_std, max_shift,
                        max_rotate_deg, fill)
    return apply


def augment_volume(*, brightness: float = 0.1, contrast: float = 0.1, noise_std: float = 0.02,
                   max_shift: float = 0.05, max_rotate_deg: float = 5.0,
                   fill: float = 0.0) -> Op:
    """Train-time augmentation of a volume [D, H, W] or [D, H, W, C]: as :func:`augment`, with
    one in-plane rotation/shift applied identically to every slice. No flips (laterality)."""
    def apply(x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = _check(x, "augment_volume", (3, 4))
        if _is_channels_last_2d(x):
            raise DataError(f"augment_volume: expected a volume [D, H, W] or [D, H, W, C], got "
                            f"shape {x.shape}", reason="bad_rank")
        return _augment(x, rng, (1, 2), brightness, contrast, noise_std, max_shift,
                        max_rotate_deg, fill)
    return apply
