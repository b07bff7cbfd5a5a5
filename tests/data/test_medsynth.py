"""MedSynth: determinism, disjoint splits, answers that need the pixels, pixels that carry the
findings (checked with simple image statistics computed here), and answer/finding consistency."""
import collections
import hashlib
import json
import re

import numpy as np
import pytest

from medvl_jax.data.errors import DataError
from medvl_jax.data.medsynth import (MedSynthConfig, MedSynthSource, corpus, generate_study,
                                     study_seed)


def _src(kind="cxr", split="train", n=50, size=64, shape=(16, 32, 32), render=True, seed=0):
    return MedSynthSource(MedSynthConfig(kind=kind, split=split, num_studies=n, image_size=size,
                                         volume_shape=shape, seed=seed), render=render)


def _box_blur(a: np.ndarray, k: int = 3) -> np.ndarray:
    p = np.pad(a.astype(np.float64), k // 2, mode="edge")
    c = np.pad(np.cumsum(np.cumsum(p, 0), 1), ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


# --------------------------------------------------------------------------------------------
# Records: dtypes, shapes, spacing.
# --------------------------------------------------------------------------------------------

def test_record_schema_dtypes_shapes_spacing():
    cxr = _src("cxr", size=64)[np.int64(3)]
    assert cxr["id"] == "cxr-train-000003" and cxr["modality"] == "xray"
    assert cxr["image"].dtype == np.uint8 and cxr["image"].shape == (64, 64)
    np.testing.assert_allclose(cxr["spacing"], [5.0, 5.0])  # 320 mm field of view / 64
    assert cxr["spacing"].dtype == np.float32
    pair = _src("longitudinal", size=48)[0]
    assert pair["image"].dtype == np.uint8 and pair["image"].shape == (2, 48, 48)
    np.testing.assert_allclose(pair["spacing"], [320 / 48] * 2, rtol=1e-6)
    ct = _src("ct", shape=(16, 32, 40))[1]
    assert ct["modality"] == "ct" and ct["image"].dtype == np.int16
    assert ct["image"].shape == (16, 32, 40)
    np.testing.assert_allclose(ct["spacing"], [240 / 16, 320 / 32, 320 / 40])
    assert ct["image"].min() >= -1024 and (ct["image"] < -900).mean() > 0.2  # air around body
    for rec in (cxr, pair, ct):
        assert rec["report"].startswith(("FINDINGS:", "COMPARISON:"))
        assert "IMPRESSION:" in rec["report"]
        json.loads(rec["findings"])
        assert 5 <= len(rec["qa"]) <= 12
        for q in rec["qa"]:
            assert set(q) == {"question", "answer", "type", "template", "options"}
    src = _src("cxr", n=7)
    assert len(src) == 7 and "cxr" in repr(src) and src[-1]["id"] == src[6]["id"]
    with pytest.raises(IndexError):
        src[7]
    with pytest.raises(DataError):
        MedSynthConfig(kind="mri")
    with pytest.raises(DataError):
        MedSynthConfig(split="dev")


def test_question_types_per_kind():
    seen = collections.defaultdict(set)
    for kind in ("cxr", "ct", "longitudinal"):
        for i in range(200):
            for q in _src(kind, n=200, render=False)[i]["qa"]:
                seen[kind].add(q["type"])
    assert seen["cxr"] == {"closed", "open", "multiple_choice", "counting", "size", "box"}
    assert seen["ct"] == {"closed", "open", "multiple_choice", "counting", "size"}
    assert {"progression", "closed", "counting", "multiple_choice"} <= seen["longitudinal"]


# --------------------------------------------------------------------------------------------
# Determinism and splits.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cxr", "ct", "longitudinal"])
def test_deterministic_and_render_free_text(kind):
    a, b = _src(kind)[5], _src(kind)[5]
    assert a["image"].tobytes() == b["image"].tobytes()
    assert (a["report"], a["findings"], a["qa"]) == (b["report"], b["findings"], b["qa"])
    other = _src(kind)[6]
    assert other["image"].tobytes() != a["image"].tobytes()
    val = _src(kind, split="val")[5]
    assert val["image"].tobytes() != a["image"].tobytes()
    assert _src(kind, seed=1)[5]["image"].tobytes() != a["image"].tobytes()
    for i in range(20):
        r, t = _src(kind)[i], _src(kind, render=False)[i]
        assert t.get("image") is None
        assert (r["report"], r["findings"], r["qa"]) == (t["report"], t["findings"], t["qa"])
    # generate_study is the same function the source calls.
    g = generate_study(kind, study_seed(0, "train", kind, 5), image_size=64,
                       volume_shape=(16, 32, 32), study_id=a["id"])
    assert g["image"].tobytes() == a["image"].tobytes() and g["qa"] == a["qa"]


def test_splits_are_disjoint():
    seeds = {split: {tuple(study_seed(0, split, "cxr", i).generate_state(4)) for i in range(300)}
             for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"]
                or seeds["val"] & seeds["test"])
    digests = {}
    for split in ("train", "val", "test"):
        src = _src("cxr", split=split, n=200, size=32)
        digests[split] = {hashlib.sha1(src[i]["image"].tobytes()).hexdigest() for i in range(200)}
        assert len(digests[split]) == 200
    assert not (digests["train"] & digests["val"] or digests["train"] & digests["test"]
                or digests["val"] & digests["test"])


def test_corpus_is_text_of_train_studies():
    texts = list(corpus(num_studies=5))
    rec = _src("ct", n=5, shape=(32, 64, 64), render=False)[2]  # corpus uses the defaults
    assert rec["report"] in texts and rec["qa"][0]["question"] in texts
    assert all(isinstance(t, str) and t for t in texts)


# --------------------------------------------------------------------------------------------
# Answers need the image: a text-only baseline scores near chance.
# --------------------------------------------------------------------------------------------

def _baseline(kind: str, n_train: int, n_test: int) -> dict[str, tuple[float, int]]:
    """Majority answer per (template, exact question), falling back to per template."""
    by_text, by_tpl = collections.defaultdict(collections.Counter), collections.defaultdict(
        collections.Counter)
    src = _src(kind, n=n_train, render=False)
    for i in range(n_train):
        for q in src[i]["qa"]:
            by_text[(q["template"], q["question"])][q["answer"]] += 1
            by_tpl[q["template"]][q["answer"]] += 1
    hits, totals = collections.Counter(), collections.Counter()
    test = _src(kind, split="test", n=n_test, render=False)
    for i in range(n_test):
        for q in test[i]["qa"]:
            table = by_text.get((q["template"], q["question"])) or by_tpl[q["template"]]
            guess = table.most_common(1)[0][0] if table else ""
            hits[q["type"]] += guess == q["answer"]
            totals[q["type"]] += 1
    return {t: (hits[t] / totals[t], totals[t]) for t in totals}


@pytest.mark.parametrize("kind", ["cxr", "ct", "longitudinal"])
def test_text_only_baseline_is_near_chance(kind):
    acc = _baseline(kind, 3000, 1000)
    print(kind, {t: round(a, 3) for t, (a, _) in acc.items()})
    assert acc["closed"][0] <= 0.60
    assert acc["counting"][0] <= 0.40  # four counts
    assert acc["multiple_choice"][0] <= 0.40  # four options
    if kind == "longitudinal":
        assert acc["progression"][0] <= 0.35


# --------------------------------------------------------------------------------------------
# The pixels carry the findings.
# --------------------------------------------------------------------------------------------

def _contrast(im: np.ndarray, cx: float, cy: float, half: float) -> float:
    """Mean of a disc at (cx, cy) (pixels) minus the dark (lung) part of its surrounding ring."""
    yy, xx = np.mgrid[:im.shape[0], :im.shape[1]] + 0.5
    dist = np.hypot(xx - cx, yy - cy)
    core = im[dist <= max(0.5 * half, 0.8)].mean()
    ring = np.percentile(im[(dist > half + 1.5) & (dist <= 2 * half + 3)], 10)
    return core - ring


def _parse_box(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", text)]


@pytest.mark.parametrize("size", [128, 64])
def test_nodules_are_bright_blobs_at_their_boxes(size):
    src = _src("cxr", split="val", n=60, size=size)
    checked = 0
    for i in range(60):
        rec = src[i]
        f = json.loads(rec["findings"])
        im = rec["image"].astype(np.float64)
        for n in f["nodules"]:
            x0, y0, x1, y1 = n["box"]
            c, r = (x0 + x1) / 200 * size, (y0 + y1) / 200 * size  # box centre in pixels
            half = (x1 - x0) / 200 * size
            assert _contrast(im, c, r, half) > 55, (rec["id"], n)
            # The box is the nodule's diameter wide (1 % of the image is 3.2 mm).
            assert abs((x1 - x0) * 3.2 - n["diameter_mm"]) <= 6.4
            assert abs((y1 - y0) * 3.2 - n["diameter_mm"]) <= 6.4
            checked += 1
        for q in rec["qa"]:
            if q["type"] == "box":
                cell = re.search(r"the (\w+) (\w+) zone", q["question"]).groups()
                match = [n for n in f["nodules"] if (n["side"], n["zone"]) == cell]
                assert len(match) == 1 and _parse_box(q["answer"]) == match[0]["box"]
    assert checked > 40


def _measure_ctr(img: np.ndarray, heart_row: float) -> float:
    """Heart width at the given row over the widest lung-to-lung span (both from pixels)."""
    im = _box_blur(img, 3)
    h, w = im.shape
    bg = np.median(im[:, :3])
    lung_level = np.percentile(im[int(0.25 * h):int(0.55 * h), int(0.15 * w):int(0.85 * w)], 10)
    heart_level = np.percentile(im[int(0.4 * h):int(0.75 * h), int(0.4 * w):int(0.6 * w)], 90)
    thr = (lung_level + heart_level) / 2
    thorax = 0
    for y in range(int(0.2 * h), int(0.8 * h)):
        row = im[y]
        body = np.nonzero(row > bg + 25)[0]
        inside = np.zeros(w, bool)
        inside[body[0] + 3:body[-1] - 2] = True
        lung = np.nonzero(inside & (row < thr))[0]
        if len(lung) > 1:
            thorax = max(thorax, lung[-1] - lung[0] + 1)
    row = im[int(heart_row * h)]
    left = right = w // 2 + w // 20
    while left > 0 and row[left - 1] >= thr:
        left -= 1
    while right < w - 1 and row[right + 1] >= thr:
        right += 1
    return (right - left + 1) / thorax


def test_heart_width_tracks_cardiothoracic_ratio():
    src = _src("cxr", split="val", n=80, size=128)
    stored, measured = [], []
    for i in range(80):
        rec = src[i]
        f = json.loads(rec["findings"])
        stored.append(f["ctr"])
        measured.append(_measure_ctr(rec["image"], f["anatomy"]["heart_center_v"]))
        assert (f["ctr"] > 0.5) == f["cardiomegaly"]
    stored, measured = np.array(stored), np.array(measured)
    assert np.corrcoef(stored, measured)[0, 1] > 0.85
    assert ((measured > 0.5) == (stored > 0.5)).mean() > 0.9
    assert np.abs(measured - stored).mean() < 0.05


def test_effusion_brightens_the_lower_lateral_lung():
    src = _src("cxr", split="val", n=80, size=64)
    stat, label = [], []
    for i in range(80):
        rec = src[i]
        f = json.loads(rec["findings"])
        im = rec["image"].astype(np.float64)
        for side, cols in (("right", slice(10, 17)), ("left", slice(47, 54))):
            lower, upper = im[41:46, cols].mean(), im[22:29, cols].mean()
            stat.append(lower - upper)
            label.append(f["effusion"] in (side, "both"))
    stat, label = np.array(stat), np.array(label)
    assert stat[label].mean() - stat[~label].mean() > 40
    thr = (stat[label].mean() + stat[~label].mean()) / 2
    assert ((stat > thr) == label).mean() > 0.9


def test_ct_lesions_have_their_hu_in_their_slices():
    d, h, w = 32, 64, 64
    src = _src("ct", split="val", n=40, shape=(d, h, w))
    checked = 0
    for i in range(40):
        rec = src[i]
        vol = rec["image"].astype(np.float64)
        f = json.loads(rec["findings"])
        for n in f["lesions"]:
            k0, k1 = n["slices"]
            zc = (np.arange(d) + 0.5) / d
            assert k0 <= int(np.argmin(np.abs(zc - n["z"]))) <= k1
            y, x = int(n["y"] * h), int(n["x"] * w)
            centre = vol[int(np.argmin(np.abs(zc - n["z"]))), y, x]
            assert abs(centre - n["hu"]) < 50, (rec["id"], n, centre)
            for k in (k0 - 2, k1 + 2):  # Outside the slice range: lung again.
                if 0 <= k < d and vol[k, max(0, y - 6):y + 7, max(0, x - 6):x + 7].min() < -700:
                    assert vol[k, y, x] < -300, (rec["id"], n, k)
            checked += 1
        # Lung parenchyma is about -850 HU; soft tissue about +40 HU.
        lung = vol[d // 2, h // 2 - 3:h // 2 + 3, int(0.27 * w):int(0.27 * w) + 3]
        assert -950 < np.median(lung) < -750
    assert checked > 20


def test_longitudinal_pair_shows_the_progression():
    src = _src("longitudinal", split="val", n=80, size=64)
    labels = collections.Counter()
    contrasts = collections.defaultdict(list)
    for i in range(80):
        rec = src[i]
        f = json.loads(rec["findings"])
        labels[f["progression"]] += 1
        prior, cur = (im.astype(np.float64) for im in rec["image"])
        t = f["target"]
        n = [m for m in f["current" if f["progression"] != "resolved" else "prior"]["nodules"]
             if (m["side"], m["zone"]) == (t["side"], t["zone"])][0]
        cx, cy = n["u"] * 64, n["v"] * 64
        half = n["radius"] * 64
        # The prior is shifted by its pose jitter; look at the nodule's place in each image.
        j = f["prior_jitter"]
        px = (n["u"] - 0.5) * j["scale"] * 64 + 32 + j["du"] * 64
        py = (n["v"] - 0.5) * j["scale"] * 64 + 32 + j["dv"] * 64
        c_cur, c_prior = _contrast(cur, cx, cy, half), _contrast(prior, px, py, half)
        contrasts[f["progression"]].append((round(c_prior), round(c_cur)))
        present_prior, present_cur = c_prior > 55, c_cur > 55
        expected = {"new": (False, True), "resolved": (True, False),
                    "grown": (True, True), "stable": (True, True)}[f["progression"]]
        assert (present_prior, present_cur) == expected, (rec["id"], f["progression"], contrasts)
        if f["progression"] == "grown":
            assert t["current_diameter_mm"] >= t["prior_diameter_mm"] + 5
    assert min(labels.values()) >= 10


# --------------------------------------------------------------------------------------------
# Answers agree with the findings.
# --------------------------------------------------------------------------------------------

def _cell_of(text: str):
    m = re.search(r"(right|left) (upper|middle|lower) (?:zone|lung)", text)
    return m.groups() if m else None


@pytest.mark.parametrize("kind", ["cxr", "ct", "longitudinal"])
def test_answers_agree_with_findings(kind):
    src = _src(kind, n=300, render=False)
    for i in range(300):
        rec = src[i]
        f = json.loads(rec["findings"])
        cur = f["current"] if kind == "longitudinal" else f
        items = cur["lesions"] if kind == "ct" else cur["nodules"]
        cells = {(n["side"], n["zone"]): n for n in items}
        for q in rec["qa"]:
            t, a, text = q["type"], q["answer"], q["question"]
            if t == "counting":
                assert a == str(len(items))
            elif t == "multiple_choice":
                assert re.fullmatch("[A-D]", a)
                for k, opt in enumerate(q["options"]):
                    assert f"{'ABCD'[k]}. {opt}" in text
                chosen = q["options"]["ABCD".index(a)]
                if "nodule_cell" in q["template"] or "lesion_cell" in q["template"]:
                    assert _cell_of(chosen) in cells
                    assert all(_cell_of(o) not in cells for o in q["options"] if o != chosen)
                elif q["template"].endswith("effusion"):
                    assert chosen.split()[0] in (cur["effusion"], "no" if cur["effusion"] == "none"
                                                 else "both" if cur["effusion"] == "both" else "x")
                else:
                    assert chosen == f["progression"]
            elif t == "closed" and "nodule_cell" in q["template"] + q["template"].replace(
                    "lesion", "nodule"):
                assert a == ("yes" if _cell_of(text) in cells else "no")
            elif t == "closed" and "effusion_side" in q["template"]:
                side = re.search(r"(left|right)", text).group(1)
                assert a == ("yes" if cur["effusion"] in (side, "both") else "no")
            elif t == "closed" and "cardiomegaly" in q["template"]:
                assert a == ("yes" if cur["cardiomegaly"] else "no")
            elif t == "closed" and "normal" in q["template"]:
                assert a == ("yes" if cur["normal"] else "no")
            elif t == "size":
                n = cells[_cell_of(text)]
                mm = n.get("diameter_mm") if kind != "longitudinal" else \
                    f["target"]["current_diameter_mm"]
                assert a == f"{mm} mm"
            elif t == "progression":
                assert a == f["progression"] and a in ("new", "grown", "resolved", "stable")
            elif t == "open" and q["template"] == "ct.open.slices":
                assert a == "{}-{}".format(*cells[_cell_of(text)]["slices"])
            elif t == "open" and "zone" in q["template"]:
                side = re.search(r"(left|right) lung", text).group(1)
                assert [n["zone"] for n in items if n["side"] == side] == [a]
            elif t == "open" and q["template"].endswith("side") and "effusion" not in q["template"]:
                zone = re.search(r"(upper|middle|lower) zone", text).group(1)
                assert [n["side"] for n in items if n["zone"] == zone] == [a]
            elif t == "open" and "effusion" in q["template"]:
                assert a == cur["effusion"]
        if kind == "cxr":  # The report mentions every nodule with its size and place.
            for n in items:
                assert f"{n['diameter_mm']} mm" in rec["report"]
                assert f"{n['side']} {n['zone']} zone" in rec["report"]
