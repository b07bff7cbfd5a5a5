"""Drawing MedSynth studies with NumPy: chest radiographs (uint8) and chest CT volumes (int16 HU).

Rendering works in normalised coordinates on coordinate grids cached per size, so any image
size shows the same anatomy; all randomness here comes from the study's pixel stream (noise,
exposure), the geometry itself is in the findings.
"""
from __future__ import annotations

import functools

import numpy as np

from medvl_jax.data.medsynth import findings as fnd

_F = np.float32


@functools.lru_cache(maxsize=16)
def _grid2d(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (U, V) in [0, 1] of a ``size`` x ``size`` image."""
    c = ((np.arange(size, dtype=_F) + 0.5) / size).astype(_F)
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


@functools.lru_cache(maxsize=32)
def _upsampler(n: int, size: int) -> np.ndarray:
    """Linear interpolation matrix [size, n] from ``n`` control points spanning the image."""
    pos = (np.arange(size) + 0.5) / size * (n - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
    t = pos - i0
    m = np.zeros((size, n), _F)
    m[np.arange(size), i0] = 1 - t
    m[np.arange(size), i0 + 1] = t
    return m


def smooth_noise(rng: np.random.Generator, n: int, size: int, cols: int | None = None
                 ) -> np.ndarray:
    """A smooth random field [size, cols or size] with unit-variance control points on n x n."""
    m = _upsampler(n, size)
    mc = m if cols is None or cols == size else _upsampler(n, cols)
    return m @ rng.standard_normal((n, n), dtype=_F) @ mc.T


def _soft(x, width):
    """0 → 1 ramp of ``x`` over ``width`` (an anti-aliased edge)."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


def render_cxr(f: dict, size: int, rng: np.random.Generator, jitter: dict | None = None
               ) -> np.ndarray:
    """A chest-radiograph-like uint8 image [size, size] of the findings ``f``.

    ``jitter`` (``du``, ``dv``, ``scale``) moves the patient within the image (a prior study).
    """
    a = f["anatomy"]
    U, V = _grid2d(size)
    if jitter:
        U = (U - 0.5 - jitter["du"]) * (1.0 / jitter["scale"]) + 0.5
        V = (V - 0.5 - jitter["dv"]) * (1.0 / jitter["scale"]) + 0.5
    e = 1.2 / size
    cu = U - 0.5
    au = np.abs(cu)
    tw = a["thorax_half_width"]

    # Body (superellipse torso) and abdomen below the diaphragm.
    bx = cu * (1.0 / a["body_half_width"])
    by = (V - 0.62) * (1.0 / 0.66)
    body = _soft(1.0 - (bx ** 4 + by ** 4), 0.08)
    img = 0.03 + body * (0.47 + 0.08 * _soft(V - a["lung_bottom"] + 0.08, 0.1))

    # Lungs (dark), denser towards the hila, with vascular texture.
    lung = np.zeros_like(U)
    texture = smooth_noise(rng, 22, size)
    fluid = np.zeros_like(U)
    for side in fnd.SIDES:
        x, y = fnd.lung_coords(a, side, U, V)
        r = fnd.lung_radius(x, y)
        ls = _soft((1.0 - r) * a["lung_half_width"], e) * _soft(fnd.dome_v(a, side, x) - V, e)
        lung = np.maximum(lung, ls * (1.0 - 0.25 * np.clip(0.4 - x, 0.0, 1.0)))
        h = f["_fluid"][side]
        if h > 0:
            fluid += ls * _soft(V - fnd.fluid_v(a, side, h, x), 2.5 * e)
    img = img - lung * (0.36 + 0.035 * texture)

    # Mediastinum and heart (bright), clavicles and ribs (bright bands).
    med = _soft(0.045 + 0.04 * np.clip(V - 0.25, 0, 1) - au, e) * _soft(a["heart_center_v"] - V, e)
    trachea = _soft(0.012 - au, e) * _soft(0.33 - V, 0.04)
    hx = (U - a["heart_center_u"]) * (1.0 / a["heart_half_width"])
    hy = (V - a["heart_center_v"]) * (1.0 / a["heart_half_height"])
    heart = _soft((1.0 - np.sqrt(hx * hx + hy * hy)) * a["heart_half_width"], e)
    img = img * (1.0 - med) + (0.64 - 0.2 * trachea) * med
    img = img * (1.0 - heart) + 0.76 * heart
    solid = np.maximum(med, heart)
    img = img + 0.5 * fluid * (1.0 - solid)
    thorax = (_soft(tw + 0.015 - au, e) * _soft(V - a["lung_top"] + 0.04, e)
              * _soft(a["lung_bottom"] + 0.01 - V, e))
    phase = (V - 0.13 * (cu * (1.0 / tw)) ** 2) * (1.0 / a["rib_period"]) + a["rib_phase"]
    rib = np.clip(np.cos(phase * (2 * np.pi)) * 2.2 - 1.2, 0.0, 1.0)
    img = img + (0.13 * thorax * (1.0 - 0.6 * solid)) * rib
    clav = np.clip(1.0 - np.abs(V - (a["lung_top"] - 0.005 + 0.1 * au)) * (1.0 / 0.014), 0, 1)
    img = img + 0.12 * clav * _soft(0.3 - au, 0.02) * _soft(au - 0.03, 0.02)

    # Nodules: projected spheres, bright against the lung.
    for n in f["nodules"]:
        d2 = ((U - n["u"]) ** 2 + (V - n["v"]) ** 2) * (1.0 / n["radius"] ** 2)
        prof = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
        edge = _soft((1.0 - np.sqrt(d2)) * n["radius"], e)
        img = img + 0.40 * edge * (0.6 + 0.4 * prof)

    # Low-frequency exposure variation, pixel noise, then contrast/gamma via a lookup table.
    img = img + 0.03 * smooth_noise(rng, 5, size)
    img = img + rng.standard_normal((size, size), dtype=_F) * _F(0.012)
    q = np.clip(img * 1023.0, 0, 1023).astype(np.int32)
    gamma = float(rng.uniform(0.8, 1.25))
    gain = float(rng.uniform(0.9, 1.1))
    offset = float(rng.uniform(-0.04, 0.04))
    lut = np.clip((np.linspace(0, 1, 1024) ** gamma * gain + offset) * 255.0 + 0.5, 0, 255)
    return lut.astype(np.uint8)[q]


def render_ct(f: dict, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A chest-CT-like int16 volume [D, H, W] in Hounsfield units of the findings ``f``.

    Slice 0 is the most cranial; rows run anterior → posterior, columns patient right → left.
    """
    d_, h_, w_ = shape
    z = ((np.arange(d_, dtype=_F) + 0.5) / d_)[:, None, None]
    y = ((np.arange(h_, dtype=_F) + 0.5) / h_)[None, :, None]
    x = ((np.arange(w_, dtype=_F) + 0.5) / w_)[None, None, :]
    e = 1.0 / w_
    body_r = np.sqrt(((x - 0.5) / 0.42) ** 2 + ((y - 0.52) / 0.30) ** 2)[0]  # [H, W]
    body = _soft((1.0 - body_r) * 0.3, e)
    inner = _soft((0.93 - body_r) * 0.3, e)
    plane = -1000.0 + body * 900.0 + inner * 140.0  # air, fat (-100), soft tissue (+40)
    ring = _soft((body_r - 0.84) * 0.3, e) * _soft((0.9 - body_r) * 0.3, e)
    spine = _soft((0.055 - np.sqrt((x - 0.5) ** 2 + (y - 0.78) ** 2)), e)[0]
    aorta = _soft((0.032 - np.sqrt((x - 0.46) ** 2 + (y - 0.66) ** 2)), e)[0]
    plane = plane + 420.0 * spine + 5.0 * aorta
    vol = np.broadcast_to(plane, shape).astype(_F)
    ribs = np.clip(np.cos((z * 7.0 + 0.15 * (x - 0.5)) * 2 * np.pi) * 2.0 - 0.8, 0.0, 1.0)
    vol = vol + 600.0 * ring * ribs

    lung = np.zeros(shape, _F)
    for side in fnd.SIDES:
        lung = np.maximum(lung, _soft((1.0 - fnd.ct_lung_value(side, z, y, x)) * 0.15, e))
    lung = lung * _soft((fnd.ct_heart_value(z, y, x) - 1.0) * 0.12, e)
    texture = smooth_noise(rng, 16, h_, w_)
    vol = vol * (1.0 - lung) + lung * (-850.0 + 25.0 * texture)

    for n in f["lesions"]:
        rz, ry, rx = n["radius"]
        z0, z1 = max(0, int((n["z"] - rz) * d_) - 1), min(d_, int((n["z"] + rz) * d_) + 2)
        y0, y1 = max(0, int((n["y"] - ry) * h_) - 1), min(h_, int((n["y"] + ry) * h_) + 2)
        x0, x1 = max(0, int((n["x"] - rx) * w_) - 1), min(w_, int((n["x"] + rx) * w_) + 2)
        dd = np.sqrt(((z[z0:z1] - n["z"]) / rz) ** 2 + ((y[:, y0:y1] - n["y"]) / ry) ** 2
                     + ((x[:, :, x0:x1] - n["x"]) / rx) ** 2)
        sub = vol[z0:z1, y0:y1, x0:x1]
        vol[z0:z1, y0:y1, x0:x1] = np.where(dd < 1.0, _F(n["hu"]), sub)

    vol = vol + rng.standard_normal(shape, dtype=_F) * _F(12.0)
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
