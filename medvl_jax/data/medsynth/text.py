"""Reports and question–answer pairs of MedSynth studies, made from their findings.

Question answers are balanced per template: for a closed question the target answer is drawn
first (with a probability that compensates for how often each answer is possible) and the
question parameters (side, zone) are then chosen consistent with it; multiple-choice options
are shuffled so that the correct letter is uniform. A model that reads only the question text
therefore scores at chance.
"""
from __future__ import annotations

import numpy as np

from medvl_jax.data.medsynth import findings as fnd

LETTERS = "ABCD"


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _qa(question: str, answer: str, qtype: str, template: str, options=()) -> dict:
    return {"question": question, "answer": answer, "type": qtype, "template": template,
            "options": list(options)}


def _cell(side: str, zone: str, ct: bool = False) -> str:
    return f"{side} {zone} lung" if ct else f"{side} {zone} zone"


def _closed_cell(rng, present: set, q_yes: float):
    """(side, zone, answer) for a balanced closed question about a cell, or None."""
    want_yes = rng.random() < q_yes
    pool = [c for c in fnd.CELLS if (c in present) == want_yes]
    if not pool:
        return None
    side, zone = _pick(rng, pool)
    return side, zone, "yes" if want_yes else "no"


def _multiple_choice(rng, stem: str, correct: str, distractors: list[str],
                     template: str) -> dict:
    options = [correct] + list(distractors)
    order = rng.permutation(len(options))
    options = [options[int(i)] for i in order]
    letter = LETTERS[options.index(correct)]
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return _qa(f"{stem}\n{lines}\nAnswer with the letter.", letter, "multiple_choice", template,
               options)


def _single_per(items: list[dict], key: str, values) -> dict[str, dict]:
    """Value of ``key`` → the only item having it (values held by exactly one item)."""
    out = {}
    for v in values:
        hit = [n for n in items if n[key] == v]
        if len(hit) == 1:
            out[v] = hit[0]
    return out


# --------------------------------------------------------------------------------------------
# Questions.
# --------------------------------------------------------------------------------------------

_NODULE_CELL_Q = ("Is there a nodule in the {loc}?", "Does the {loc} contain a pulmonary nodule?",
                  "Is a nodule seen in the {loc}?")
_EFF_SIDE_Q = ("Is there a pleural effusion on the {side} side?",
               "Is there a {side} pleural effusion?", "Is the {side} costophrenic angle blunted?")
_CARDIO_Q = ("Is the heart enlarged?", "Is there cardiomegaly?",
             "Is the cardiothoracic ratio above 0.5?")


def _effusion_questions(rng, f: dict, prefix: str, tpl: str, out: list) -> None:
    eff = f["effusion"]
    present = {s for s in fnd.SIDES if eff in (s, "both")}
    want_yes = rng.random() < 0.5  # Both answers are possible in 3 of 4 effusion states.
    pool = [s for s in fnd.SIDES if (s in present) == want_yes]
    if pool:
        side = _pick(rng, pool)
        out.append(_qa(prefix + _pick(rng, _EFF_SIDE_Q).format(side=side),
                       "yes" if want_yes else "no", "closed", f"{tpl}.closed.effusion_side"))


def cxr_questions(rng: np.random.Generator, f: dict) -> list[dict]:
    """QA pairs of one chest radiograph (all seven types except progression)."""
    out: list[dict] = []
    nods = f["nodules"]
    cells = {(n["side"], n["zone"]) for n in nods}
    # Closed. Yes is possible for 3/4 of studies, no always: P(target yes) = 1 / (1 + 3/4).
    c = _closed_cell(rng, cells, 4 / 7)
    if c:
        out.append(_qa(_pick(rng, _NODULE_CELL_Q).format(loc=_cell(c[0], c[1])), c[2], "closed",
                       "cxr.closed.nodule_cell"))
    _effusion_questions(rng, f, "", "cxr", out)
    out.append(_qa(_pick(rng, _CARDIO_Q), "yes" if f["cardiomegaly"] else "no", "closed",
                   "cxr.closed.cardiomegaly"))
    # Normal studies are 1 in 32: ask about abnormal ones as often as about normal ones.
    if f["normal"] or rng.random() < 1 / 31:
        out.append(_qa(_pick(rng, ("Is this chest radiograph normal?",
                                   "Is this a normal study?")),
                       "yes" if f["normal"] else "no", "closed", "cxr.closed.normal"))
    # Counting.
    out.append(_qa(_pick(rng, ("How many pulmonary nodules are visible?",
                               "How many nodules are there?", "Count the lung nodules.")),
                   str(len(nods)), "counting", "cxr.counting.nodules"))
    # Open.
    by_side = _single_per(nods, "side", fnd.SIDES)
    if by_side:
        side = _pick(rng, sorted(by_side))
        out.append(_qa(f"In which zone of the {side} lung is the nodule?", by_side[side]["zone"],
                       "open", "cxr.open.nodule_zone"))
    by_zone = _single_per(nods, "zone", fnd.ZONES)
    if by_zone:
        zone = _pick(rng, sorted(by_zone))
        out.append(_qa(f"On which side is the nodule in the {zone} zone?",
                       by_zone[zone]["side"], "open", "cxr.open.nodule_side"))
    if f["effusion"] != "none":
        out.append(_qa(_pick(rng, ("On which side is the pleural effusion?",
                                   "Which side has a pleural effusion? "
                                   "Answer left, right or both.")),
                       f["effusion"], "open", "cxr.open.effusion_side"))
    # Multiple choice.
    if nods:
        n = _pick(rng, nods)
        empty = [c for c in fnd.CELLS if c not in cells]
        dis = [empty[int(i)] for i in rng.choice(len(empty), 3, replace=False)]
        out.append(_multiple_choice(rng, "Which region contains a nodule?",
                                    _cell(n["side"], n["zone"]), [_cell(*d) for d in dis],
                                    "cxr.mc.nodule_cell"))
    eff_text = {"none": "no effusion", "left": "left", "right": "right", "both": "both sides"}
    out.append(_multiple_choice(rng, "Where is there a pleural effusion?", eff_text[f["effusion"]],
                                [v for k, v in eff_text.items() if k != f["effusion"]],
                                "cxr.mc.effusion"))
    # Size and box.
    if nods:
        n = _pick(rng, nods)
        out.append(_qa(_pick(rng, ("What is the diameter of the nodule in the {loc}?",
                                   "How large is the nodule in the {loc}?")).format(
            loc=_cell(n["side"], n["zone"])), f"{n['diameter_mm']} mm", "size", "cxr.size.nodule"))
        n = _pick(rng, nods)
        out.append(_qa(f"Locate the nodule in the {_cell(n['side'], n['zone'])}. Give its bounding "
                       "box as [x0, y0, x1, y1] in percent of the image width and height.",
                       "[{}, {}, {}, {}]".format(*n["box"]), "box", "cxr.box.nodule"))
    return out


def longitudinal_questions(rng: np.random.Generator, f: dict) -> list[dict]:
    """QA pairs of a prior/current pair: progression plus questions on the current study."""
    cur, t = f["current"], f["target"]
    loc = _cell(t["side"], t["zone"])
    out = [_qa(_pick(rng, ("Compared with the prior study, how has the nodule in the {loc} "
                           "changed? Answer new, grown, resolved or stable.",
                           "Is the nodule in the {loc} new, grown, resolved or stable since the "
                           "prior study?")).format(loc=loc),
               f["progression"], "progression", "long.progression")]
    out.append(_multiple_choice(rng, f"How has the nodule in the {loc} changed since the prior?",
                                f["progression"],
                                [p for p in fnd.PROGRESSIONS if p != f["progression"]],
                                "long.mc.progression"))
    nods = cur["nodules"]
    cells = {(n["side"], n["zone"]) for n in nods}
    # The current study has no nodule in 1/12 of pairs: P(target yes) = 1 / (1 + 11/12).
    c = _closed_cell(rng, cells, 12 / 23)
    if c:
        out.append(_qa("On the current study, is there a nodule in the {}?".format(
            _cell(c[0], c[1])),
            c[2], "closed", "long.closed.nodule_cell"))
    _effusion_questions(rng, cur, "On the current study: ", "long", out)
    out.append(_qa(_pick(rng, _CARDIO_Q), "yes" if cur["cardiomegaly"] else "no", "closed",
                   "long.closed.cardiomegaly"))
    # Counts 1 and 2 are a third each, 3 a quarter: thin them to a quarter each.
    k = len(nods)
    if k in (0, 3) or rng.random() < 0.75:
        out.append(_qa("How many nodules are visible on the current study?", str(k), "counting",
                       "long.counting.nodules"))
    if f["progression"] != "resolved":
        out.append(_qa(f"What is the current diameter of the nodule in the {loc}?",
                       f"{t['current_diameter_mm']} mm", "size", "long.size.nodule"))
    return out


def ct_questions(rng: np.random.Generator, f: dict) -> list[dict]:
    """QA pairs of one chest CT volume."""
    out: list[dict] = []
    les = f["lesions"]
    cells = {(n["side"], n["zone"]) for n in les}
    c = _closed_cell(rng, cells, 4 / 7)
    if c:
        out.append(_qa(_pick(rng, ("Is there a lesion in the {loc}?",
                                   "Does the {loc} contain a nodule?")).format(
            loc=_cell(c[0], c[1], ct=True)), c[2], "closed", "ct.closed.lesion_cell"))
    out.append(_qa(_pick(rng, ("How many lung lesions are there?",
                               "How many pulmonary nodules does this CT show?")),
                   str(len(les)), "counting", "ct.counting.lesions"))
    if les:
        n = _pick(rng, les)
        loc = _cell(n["side"], n["zone"], True)
        out.append(_qa(f"What is the diameter of the lesion in the {loc}?",
                       f"{n['diameter_mm']} mm", "size", "ct.size.lesion"))
        n = _pick(rng, les)
        out.append(_qa(f"On which slices is the lesion in the {_cell(n['side'], n['zone'], True)} "
                       "visible? Answer first-last (slice 0 is the most cranial).",
                       "{}-{}".format(*n["slices"]), "open", "ct.open.slices"))
        n = _pick(rng, les)
        empty = [c for c in fnd.CELLS if c not in cells]
        dis = [empty[int(i)] for i in rng.choice(len(empty), 3, replace=False)]
        out.append(_multiple_choice(rng, "Which region contains a lesion?",
                                    _cell(n["side"], n["zone"], True),
                                    [_cell(*d, ct=True) for d in dis], "ct.mc.lesion_cell"))
    by_side = _single_per(les, "side", fnd.SIDES)
    if by_side:
        side = _pick(rng, sorted(by_side))
        out.append(_qa(f"In which zone of the {side} lung is the lesion?", by_side[side]["zone"],
                       "open", "ct.open.lesion_zone"))
    by_zone = _single_per(les, "zone", fnd.ZONES)
    if by_zone:
        zone = _pick(rng, sorted(by_zone))
        out.append(_qa(f"Which lung contains the lesion in the {zone} zone?",
                       by_zone[zone]["side"], "open", "ct.open.lesion_side"))
    return out


# --------------------------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------------------------

_NODULE_WORDS = ("nodule", "nodular opacity", "rounded opacity")
_CLEAR_LUNGS = ("The lungs are clear.", "No pulmonary nodule or mass is seen.",
                "The lung fields are clear without focal opacity.")
_NO_EFF = ("No pleural effusion.", "The costophrenic angles are sharp.",
           "No pleural effusion or pneumothorax.")
_BONES = ("No acute osseous abnormality.", "The visualised bones are intact.",
          "Osseous structures are unremarkable.")


def _an(number: int, capital: bool = True) -> str:
    """'A' or 'An' before a spoken number (an 8, an 11, an 18, an 80-something)."""
    word = "an" if str(number).startswith("8") or number in (11, 18) else "a"
    return word.capitalize() if capital else word


def _nodule_sentence(rng, n: dict) -> str:
    word = _pick(rng, _NODULE_WORDS)
    where = _pick(rng, ("in", "projecting over"))
    return _pick(rng, ("There is {a} {d} mm {w} {p} the {loc}.",
                       "{A} {d} mm {w} is seen {p} the {loc}.")
                 ).format(d=n["diameter_mm"], w=word, p=where, loc=_cell(n["side"], n["zone"]),
                          a=_an(n["diameter_mm"], False), A=_an(n["diameter_mm"]))


def _effusion_sentence(rng, f: dict) -> str:
    eff = f["effusion"]
    if eff == "none":
        return _pick(rng, _NO_EFF)
    h = max(f["effusion_height_mm"].values())
    size = "Small" if h < 60 else "Moderate"
    where = "bilateral" if eff == "both" else eff
    angle = "angles" if eff == "both" else "angle"
    return _pick(rng, ("{s} {w} pleural effusion with blunting of the costophrenic {a}.",
                       "{s} {w} pleural effusion with a meniscus at the lung base.")
                 ).format(s=size, w=where, a=angle)


def _heart_sentence(rng, f: dict) -> str:
    ctr = f["ctr"]
    if f["cardiomegaly"]:
        return _pick(rng, ("The heart is enlarged (cardiothoracic ratio {r:.2f}).",
                           "Cardiomegaly, cardiothoracic ratio {r:.2f}.")).format(r=ctr)
    return _pick(rng, ("Heart size is normal (cardiothoracic ratio {r:.2f}).",
                       "Normal cardiomediastinal silhouette, cardiothoracic ratio {r:.2f}.")
                 ).format(r=ctr)


def _impression_items(f: dict) -> list[str]:
    items = []
    for n in f["nodules"]:
        items.append(f"{n['diameter_mm']} mm nodule in the {_cell(n['side'], n['zone'])}.")
    if f["effusion"] != "none":
        items.append(("Bilateral" if f["effusion"] == "both" else f["effusion"].capitalize())
                     + " pleural effusion.")
    if f["cardiomegaly"]:
        items.append("Cardiomegaly.")
    return items


def _format(findings: list[str], impression: list[str], rng, comparison: str = "") -> str:
    if not impression:
        impression = [_pick(rng, ("No acute cardiopulmonary abnormality.",
                                  "Normal chest radiograph."))]
    imp = impression[0] if len(impression) == 1 else " ".join(
        f"{i + 1}. {s}" for i, s in enumerate(impression))
    head = f"COMPARISON: {comparison}\n" if comparison else ""
    return f"{head}FINDINGS: {' '.join(findings)}\nIMPRESSION: {imp}"


def cxr_report(rng: np.random.Generator, f: dict) -> str:
    """FINDINGS + IMPRESSION of one chest radiograph."""
    lungs = [_nodule_sentence(rng, n) for n in f["nodules"]] or [_pick(rng, _CLEAR_LUNGS)]
    body = [*lungs, _effusion_sentence(rng, f), _heart_sentence(rng, f)]
    if rng.random() < 0.5:
        body = [body[-1]] + body[:-1]
    return _format(body + [_pick(rng, _BONES)], _impression_items(f), rng)


def longitudinal_report(rng: np.random.Generator, f: dict) -> str:
    """Report of the current study, compared with the prior."""
    cur, t, p = f["current"], f["target"], f["progression"]
    loc = _cell(t["side"], t["zone"])
    d0, d1 = t["prior_diameter_mm"], t["current_diameter_mm"]
    change = {
        "new": f"New {d1} mm nodule in the {loc}, not present on the prior study.",
        "grown": f"The nodule in the {loc} has grown from {d0} mm to {d1} mm.",
        "resolved": f"The previously seen {d0} mm nodule in the {loc} has resolved.",
        "stable": f"The {d1} mm nodule in the {loc} is unchanged in size.",
    }[p]
    others = [n for n in cur["nodules"] if (n["side"], n["zone"]) != (t["side"], t["zone"])]
    body = [change] + [f"Stable {n['diameter_mm']} mm nodule in the {_cell(n['side'], n['zone'])}."
                       for n in others]
    body += [_effusion_sentence(rng, cur), _heart_sentence(rng, cur), _pick(rng, _BONES)]
    imp = [{"new": f"New nodule in the {loc}.",
            "grown": f"Interval growth of the {loc} nodule.",
            "resolved": f"Resolution of the {loc} nodule.",
            "stable": f"Stable nodule in the {loc}."}[p]] + _impression_items(
        {**cur, "nodules": []})
    comparison = _pick(rng, ("Prior chest radiograph.", "Previous radiograph of the same patient."))
    return _format(body, imp, rng, comparison=comparison)


def ct_report(rng: np.random.Generator, f: dict) -> str:
    """FINDINGS + IMPRESSION of one chest CT."""
    body = []
    for n in f["lesions"]:
        body.append(_pick(rng, ("{A} {d} mm soft-tissue lesion ({hu} HU) in the {loc}, "
                                "slices {a}-{b}.",
                                "There is {an} {d} mm nodule in the {loc} ({hu} HU), seen on "
                                "slices {a}-{b}.")).format(d=n["diameter_mm"], hu=n["hu"],
                                                   loc=_cell(n["side"], n["zone"], True),
                                                   a=n["slices"][0], b=n["slices"][1],
                                                   A=_an(n["diameter_mm"]),
                                                   an=_an(n["diameter_mm"], False)))
    if not body:
        body.append(_pick(rng, ("No pulmonary nodule or mass.", "The lungs are clear.")))
    body.append(_pick(rng, ("No pleural effusion.", "The pleural spaces are clear.")))
    body.append(_pick(rng, ("Mediastinal structures are unremarkable.",
                            "Heart and great vessels are normal in size.")))
    imp = [f"{n['diameter_mm']} mm nodule in the {_cell(n['side'], n['zone'], True)}."
           for n in f["lesions"]]
    if not imp:
        imp = [_pick(rng, ("No pulmonary lesion.", "Normal chest CT."))]
    return _format(body, imp, rng)
