"""Sampling the structured findings of a MedSynth study (no pixels).

Everything here draws from the study's findings/text random stream, so the findings (and the
text made from them) are the same whether or not the pixels are rendered.

Geometry of a chest radiograph is described in normalised image coordinates ``u`` (column,
0 = left edge of the image) and ``v`` (row, 0 = top), both in [0, 1]. The field of view is
:data:`CXR_FOV_MM` wide and high, so ``mm = normalised * CXR_FOV_MM``. Images follow the
radiological convention: the patient's right is on the image's left.

Marginals are balanced on purpose (nodule count uniform over 0..3, nodule cells uniform over
side x zone, effusion uniform over none/left/right/both, cardiomegaly 50 %), so that questions
about them can be answered only by looking at the image.
"""
from __future__ import annotations

import math

import numpy as np

CXR_FOV_MM = 320.0
CT_FOV_MM = (240.0, 320.0, 320.0)  # (z, y, x)
SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")
CELLS = tuple((s, z) for s in SIDES for z in ZONES)
EFFUSIONS = ("none", "left", "right", "both")
PROGRESSIONS = ("new", "grown", "resolved", "stable")
NODULE_MM = (15, 30)  # 15 mm is 3 px at 64 x 64.
LESION_MM = (10, 30)


def side_sign(side: str) -> float:
    """+1 where the patient's left is (image right), -1 for the patient's right."""
    return 1.0 if side == "left" else -1.0


# --------------------------------------------------------------------------------------------
# Chest radiograph anatomy (scalar versions of the shapes the renderer draws).
# --------------------------------------------------------------------------------------------

def sample_anatomy(rng: np.random.Generator, cardiomegaly: bool) -> dict:
    """Thorax, lung, diaphragm and heart geometry of one synthetic patient (normalised units)."""
    tw = float(rng.uniform(0.36, 0.40))
    top = float(rng.uniform(0.12, 0.16))
    bottom = float(rng.uniform(0.74, 0.79))
    ctr = float(rng.uniform(0.55, 0.64) if cardiomegaly else rng.uniform(0.38, 0.46))
    hw = ctr * tw
    return {
        "thorax_half_width": tw, "lung_top": top, "lung_bottom": bottom,
        "lung_half_width": 0.43 * tw,
        "dome_right": float(rng.uniform(0.09, 0.12)), "dome_left": float(rng.uniform(0.06, 0.09)),
        "ctr": ctr, "heart_half_width": hw, "heart_center_u": 0.5 + 0.22 * hw,
        "heart_half_height": float(rng.uniform(0.12, 0.15)),
        "heart_center_v": bottom - float(rng.uniform(0.17, 0.2)),
        "rib_phase": float(rng.uniform(0, 1)), "rib_period": float(rng.uniform(0.075, 0.09)),
        "body_half_width": tw + float(rng.uniform(0.06, 0.09)),
    }


def lung_center_u(a: dict, side: str) -> float:
    """Horizontal centre of one lung field."""
    return 0.5 + side_sign(side) * (a["thorax_half_width"] - a["lung_half_width"])


def lung_coords(a: dict, side: str, u, v):
    """(x, y) lung-frame coordinates: x in [-1, 1] medial→lateral, y in [-1, 1] top→bottom."""
    x = (u - lung_center_u(a, side)) * (side_sign(side) / a["lung_half_width"])
    vc = 0.5 * (a["lung_top"] + a["lung_bottom"])
    y = (v - vc) / (0.5 * (a["lung_bottom"] - a["lung_top"]))
    return x, y


def dome_v(a: dict, side: str, x):
    """Row of the hemidiaphragm under the lung at lung-frame ``x`` (lowest laterally)."""
    h = a["dome_" + side]
    t = np.clip((1.0 - x) / 1.6, 0.0, 1.0)
    return a["lung_bottom"] - h * np.sqrt(t)


def fluid_v(a: dict, side: str, height: float, x):
    """Upper edge of a pleural effusion: a meniscus climbing towards the lateral chest wall."""
    t = np.clip((x + 1.0) * 0.5, 0.0, 1.0)
    return a["lung_bottom"] - height * (0.5 + 0.5 * t * t)


def lung_radius(x, y):
    """Superellipse radius (< 1 inside the lung outline, before the diaphragm cut)."""
    ax, ay = np.abs(x), np.abs(y)
    return np.cbrt(ax * ax * ax + ay * ay * ay)


def _inside_lung(a: dict, side: str, u: float, v: float, margin: float) -> bool:
    x, y = lung_coords(a, side, u, v)
    if lung_radius(x, y) > 1.0 - margin / a["lung_half_width"] - 0.04:
        return False
    if v > float(dome_v(a, side, x)) - margin:
        return False
    hu = (u - a["heart_center_u"]) / (a["heart_half_width"] + margin)
    hv = (v - a["heart_center_v"]) / (a["heart_half_height"] + margin)
    return hu * hu + hv * hv > 1.0 and abs(u - 0.5) > 0.07 + margin


MIN_FLUID = 0.1  # Smallest effusion height (normalised); nodules stay above it.


def _clearance(a: dict, side: str, u: float, v: float, r: float) -> float:
    """Largest effusion height whose meniscus stays below a nodule at (u, v) of radius r."""
    x, _ = lung_coords(a, side, u, v)
    t = min(max((x + 1.0) * 0.5, 0.0), 1.0)
    return (a["lung_bottom"] - v - 1.3 * r) / (0.5 + 0.5 * t * t)


def place_nodule(rng: np.random.Generator, a: dict, side: str, zone: str, diameter_mm: float,
                 others: list[dict], fluid_sides=()) -> tuple[float, float] | None:
    """Centre (u, v) of a nodule inside the given lung zone, clear of heart and other nodules,
    and above the smallest effusion if ``side`` is in ``fluid_sides``."""
    r = diameter_mm / 2.0 / CXR_FOV_MM
    top, bottom = a["lung_top"], a["lung_bottom"]
    third = (bottom - top) / 3.0
    z0 = top + ZONES.index(zone) * third
    for _ in range(200):
        v = z0 + third * float(rng.uniform(0.15, 0.85))
        x = float(rng.uniform(-0.5, 0.7))
        u = lung_center_u(a, side) + side_sign(side) * x * a["lung_half_width"]
        if not _inside_lung(a, side, u, v, 1.2 * r):
            continue
        if side in fluid_sides and _clearance(a, side, u, v, r) < MIN_FLUID:
            continue
        if any(math.hypot(u - o["u"], v - o["v"]) < r + o["radius"] + 0.02 for o in others):
            continue
        return u, v
    return None


def _box_percent(u: float, v: float, r: float) -> list[int]:
    return [int(max(0, math.floor((u - r) * 100))), int(max(0, math.floor((v - r) * 100))),
            int(min(100, math.ceil((u + r) * 100))), int(min(100, math.ceil((v + r) * 100)))]


def make_nodule(u: float, v: float, side: str, zone: str, diameter_mm: int) -> dict:
    """A nodule record: location, size, centre and box (percent of width/height, top-left)."""
    r = diameter_mm / 2.0 / CXR_FOV_MM
    return {"side": side, "zone": zone, "diameter_mm": int(diameter_mm), "u": u, "v": v,
            "radius": r, "box": _box_percent(u, v, r)}


def sample_cxr(rng: np.random.Generator) -> dict:
    """Findings of one chest radiograph: nodules, effusion, heart size, anatomy, exposure."""
    cardiomegaly = bool(rng.random() < 0.5)
    a = sample_anatomy(rng, cardiomegaly)
    effusion = EFFUSIONS[int(rng.integers(4))]
    fluid_sides = tuple(s for s in SIDES if effusion in (s, "both"))
    count = int(rng.integers(4))
    nodules: list[dict] = []
    for ci in rng.permutation(len(CELLS)):
        if len(nodules) == count:
            break
        side, zone = CELLS[int(ci)]
        d = int(rng.integers(NODULE_MM[0], NODULE_MM[1] + 1))
        pos = place_nodule(rng, a, side, zone, d, nodules, fluid_sides)
        if pos is None:  # Rare: try a smaller one in the same cell.
            d = NODULE_MM[0]
            pos = place_nodule(rng, a, side, zone, d, nodules, fluid_sides)
        if pos is not None:
            nodules.append(make_nodule(pos[0], pos[1], side, zone, d))
    return finish_cxr(a, nodules, effusion, fluid_heights(rng, a, fluid_sides, nodules),
                      cardiomegaly)


def fluid_heights(rng: np.random.Generator, a: dict, fluid_sides, nodules: list[dict]) -> dict:
    """Effusion height per side, its meniscus kept below the nodules of that side."""
    out = {}
    for s in SIDES:
        cap = min([0.22] + [_clearance(a, s, n["u"], n["v"], n["radius"])
                            for n in nodules if n["side"] == s])
        out[s] = float(rng.uniform(MIN_FLUID, max(cap, MIN_FLUID))) if s in fluid_sides else 0.0
    return out


def finish_cxr(a: dict, nodules: list[dict], effusion: str, heights: dict,
               cardiomegaly: bool) -> dict:
    """Assembles a chest radiograph findings dict (JSON-able)."""
    nodules = sorted(nodules, key=lambda n: (SIDES.index(n["side"]), ZONES.index(n["zone"])))
    return {
        "nodule_count": len(nodules), "nodules": nodules, "effusion": effusion,
        "effusion_height_mm": {s: round(h * CXR_FOV_MM, 1) for s, h in heights.items()},
        "cardiomegaly": cardiomegaly, "ctr": round(a["ctr"], 3),
        "normal": not nodules and effusion == "none" and not cardiomegaly,
        "anatomy": a, "_fluid": heights,
    }


def sample_longitudinal(rng: np.random.Generator) -> dict:
    """Prior and current findings of one patient, with a balanced progression of one nodule."""
    prior = sample_cxr(rng)
    a = prior["anatomy"]
    fluid_sides = tuple(s for s in SIDES if prior["effusion"] in (s, "both"))
    label = PROGRESSIONS[int(rng.integers(4))]
    # The target nodule lives in its own cell; up to two other nodules stay unchanged.
    cells = [CELLS[int(i)] for i in rng.permutation(len(CELLS))]
    t_side, t_zone = cells[0]
    others: list[dict] = []
    for side, zone in cells[1:1 + int(rng.integers(3))]:
        d = int(rng.integers(NODULE_MM[0], NODULE_MM[1] + 1))
        pos = place_nodule(rng, a, side, zone, d, others, fluid_sides)
        if pos is not None:
            others.append(make_nodule(pos[0], pos[1], side, zone, d))
    if label == "grown":
        d_prior = int(rng.integers(NODULE_MM[0], 21))
        d_cur = d_prior + int(rng.integers(6, 11))
    else:
        d_prior = d_cur = int(rng.integers(NODULE_MM[0], NODULE_MM[1] + 1))
    pos = place_nodule(rng, a, t_side, t_zone, max(d_prior, d_cur), others, fluid_sides)
    if pos is None:
        d_prior = d_cur = NODULE_MM[0]
        label = "stable" if label == "grown" else label
        pos = place_nodule(rng, a, t_side, t_zone, d_cur, others, fluid_sides)
        mid_v = 0.5 * (a["lung_top"] + a["lung_bottom"])
        pos = pos or (lung_center_u(a, t_side), mid_v)
    n_prior = make_nodule(pos[0], pos[1], t_side, t_zone, d_prior)
    n_cur = make_nodule(pos[0], pos[1], t_side, t_zone, d_cur)
    prior_nodules = others + ([] if label == "new" else [n_prior])
    cur_nodules = others + ([] if label == "resolved" else [n_cur])
    heights = fluid_heights(rng, a, fluid_sides, others + [make_nodule(
        pos[0], pos[1], t_side, t_zone, max(d_prior, d_cur))])
    # Pose jitter of the prior (the current study is the reference frame of every box).
    jitter = {"du": float(rng.uniform(-0.03, 0.03)), "dv": float(rng.uniform(-0.03, 0.03)),
              "scale": float(rng.uniform(0.96, 1.04))}
    return {
        "prior": finish_cxr(a, prior_nodules, prior["effusion"], heights, prior["cardiomegaly"]),
        "current": finish_cxr(a, cur_nodules, prior["effusion"], heights, prior["cardiomegaly"]),
        "progression": label,
        "target": {"side": t_side, "zone": t_zone, "prior_diameter_mm": d_prior,
                   "current_diameter_mm": d_cur},
        "prior_jitter": jitter,
    }


# --------------------------------------------------------------------------------------------
# CT.
# --------------------------------------------------------------------------------------------

CT_LUNG = {"z0": 0.06, "z1": 0.92, "cx": 0.19, "cy": 0.50, "ax": 0.155, "ay": 0.24}


def ct_lung_scale(z):
    """Axial size of the lungs along z (0 = top slice, apex; 1 = bottom slice, bases)."""
    t = np.clip((z - CT_LUNG["z0"]) / (CT_LUNG["z1"] - CT_LUNG["z0"]), 0.0, 1.0)
    return np.sqrt(np.clip(np.sin(np.pi * np.minimum(t, 0.92) / 1.84) * 1.05, 0.0, 1.0)) * (t > 0)


def ct_lung_value(side: str, z, y, x):
    """Ellipse radius of the lung at (z, y, x) normalised; < 1 inside (before the heart cut)."""
    s = np.maximum(ct_lung_scale(z), 1e-3)
    cx = 0.5 + side_sign(side) * CT_LUNG["cx"]
    return np.sqrt(((x - cx) / (CT_LUNG["ax"] * s)) ** 2
                   + ((y - CT_LUNG["cy"]) / (CT_LUNG["ay"] * s)) ** 2)


def ct_heart_value(z, y, x):
    """Ellipse radius of the heart (present in the lower half of the lungs)."""
    s = np.clip((z - 0.45) / 0.35, 0.0, 1.0) * (z < 0.95)
    s = np.maximum(np.sqrt(s), 1e-3)
    return np.sqrt(((x - 0.545) / (0.12 * s)) ** 2 + ((y - 0.44) / (0.13 * s)) ** 2)


def sample_ct(rng: np.random.Generator, volume_shape: tuple[int, int, int]) -> dict:
    """Findings of one chest CT: 0..3 lesions in distinct (side, zone) cells."""
    d_, h_, w_ = volume_shape
    count = int(rng.integers(4))
    lesions: list[dict] = []
    zspan = CT_LUNG["z1"] - CT_LUNG["z0"]
    for ci in rng.permutation(len(CELLS)):
        if len(lesions) == count:
            break
        side, zone = CELLS[int(ci)]
        dmm = int(rng.integers(LESION_MM[0], LESION_MM[1] + 1))
        r = np.array([dmm / 2.0 / f for f in CT_FOV_MM])  # (z, y, x) normalised radii
        r[0] = max(r[0], 0.55 / d_)  # Thin lesions still cross at least one slice centre.
        for _ in range(300):
            z = CT_LUNG["z0"] + zspan * (ZONES.index(zone) + float(rng.uniform(0.15, 0.85))) / 3
            y = float(rng.uniform(0.3, 0.7))
            x = 0.5 + side_sign(side) * float(rng.uniform(0.08, 0.32))
            ok = all(float(ct_lung_value(side, z + dz, y + dy, x + dx)) < 0.92
                     and float(ct_heart_value(z + dz, y + dy, x + dx)) > 1.05
                     for dz, dy, dx in ((0, 0, 0), (r[0], 0, 0), (-r[0], 0, 0), (0, r[1], 0),
                                        (0, -r[1], 0), (0, 0, r[2]), (0, 0, -r[2])))
            ok = ok and all(abs(z - o["z"]) > r[0] + o["radius"][0] + 0.02
                            or math.hypot(x - o["x"], y - o["y"]) > r[2] + o["radius"][2] + 0.02
                            for o in lesions)
            if ok:
                break
        else:
            continue
        k = np.arange(d_)
        zc = (k + 0.5) / d_
        inside = np.nonzero(np.abs(zc - z) < r[0])[0]
        if inside.size == 0:
            inside = np.array([int(np.clip(np.floor(z * d_), 0, d_ - 1))])
        lesions.append({"side": side, "zone": zone, "diameter_mm": dmm,
                        "hu": int(rng.integers(40, 81)), "z": z, "y": y, "x": x,
                        "radius": [float(v) for v in r],
                        "slices": [int(inside[0]), int(inside[-1])]})
    lesions.sort(key=lambda n: (SIDES.index(n["side"]), ZONES.index(n["zone"])))
    return {"lesion_count": len(lesions), "lesions": lesions,
            "normal": not lesions}
