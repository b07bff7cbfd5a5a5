"""MedSynth's zero-shot prompts and label names: what evaluators and configs name, not tasks.

* :func:`prompts` — per chest-radiograph finding, prompt ensembles saying it is absent and
  present (``report`` style: whole reports in which every other finding is normal, so the two
  classes differ only in the finding asked about; ``sentence`` style: the sentences alone).
  A ``zero_shot`` evaluator takes them as ``classes = medsynth_zero_shot_classes(style)``.
* :data:`CXR_LABELS` — the nine regional findings of a radiograph (a nodule per lung zone, an
  effusion per side, cardiomegaly), the outputs of the classify recipe's tower.
"""
from __future__ import annotations

from medvl_jax.data.medsynth import findings

CXR_LABELS = (tuple(f"nodule_{side}_{zone}" for side, zone in findings.CELLS)
              + tuple(f"effusion_{side}" for side in findings.SIDES) + ("cardiomegaly",))

# Zero-shot prompt ensembles. Per finding: sentences saying it is absent, and (sentence,
# impression item) pairs saying it is present. "sentence" prompts are these sentences alone;
# "report" prompts are whole reports (FINDINGS + IMPRESSION) in which every other finding is
# normal, so that the two classes differ only in the finding asked about.
_ABSENT = {
    "nodule": ("The lungs are clear.", "No pulmonary nodule or mass is seen.",
               "The lung fields are clear without focal opacity."),
    "effusion": ("No pleural effusion.", "The costophrenic angles are sharp.",
                 "No pleural effusion or pneumothorax."),
    "cardiomegaly": ("Heart size is normal (cardiothoracic ratio 0.42).",
                     "Normal cardiomediastinal silhouette, cardiothoracic ratio 0.44.",
                     "Heart size is normal (cardiothoracic ratio 0.40)."),
}
_PRESENT = {
    "nodule": (("There is a 20 mm nodule in the right upper zone.",
                "20 mm nodule in the right upper zone."),
               ("A 25 mm rounded opacity is seen in the left lower zone.",
                "25 mm nodule in the left lower zone."),
               ("There is a 17 mm nodular opacity projecting over the right mid zone.",
                "17 mm nodule in the right mid zone."),
               ("A 22 mm nodule is seen in the left mid zone.",
                "22 mm nodule in the left mid zone.")),
    "effusion": (("Small right pleural effusion with blunting of the costophrenic angle.",
                  "Right pleural effusion."),
                 ("Moderate left pleural effusion with a meniscus at the lung base.",
                  "Left pleural effusion."),
                 ("Moderate bilateral pleural effusion with blunting of the costophrenic "
                  "angles.", "Bilateral pleural effusion.")),
    "cardiomegaly": (("The heart is enlarged (cardiothoracic ratio 0.58).", "Cardiomegaly."),
                     ("Cardiomegaly, cardiothoracic ratio 0.61.", "Cardiomegaly."),
                     ("The heart is enlarged (cardiothoracic ratio 0.55).", "Cardiomegaly.")),
}
_BONES = ("Osseous structures are unremarkable.", "No acute osseous abnormality.",
          "The visualised bones are intact.")
FINDINGS = tuple(_ABSENT)
PROMPT_STYLES = ("report", "sentence")


def _report(sentences: dict, impression: list[str], i: int) -> str:
    body = " ".join([sentences["nodule"], sentences["effusion"], sentences["cardiomegaly"],
                     _BONES[i % len(_BONES)]])
    imp = impression or ["No acute cardiopulmonary abnormality." if i % 2
                         else "Normal chest radiograph."]
    return f"FINDINGS: {body}\nIMPRESSION: {' '.join(imp)}"


def prompts(finding: str, style: str = "report") -> tuple[list[str], list[str]]:
    """``(absent prompts, present prompts)`` of a finding (nodule, effusion, cardiomegaly)."""
    if finding not in _ABSENT:
        raise KeyError(f"no prompts for finding {finding!r}; known: {FINDINGS}")
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "sentence":
        return list(_ABSENT[finding]), [s for s, _ in _PRESENT[finding]]
    absent, present = [], []
    for i in range(3):
        normal = {f: _ABSENT[f][(i + k) % 3] for k, f in enumerate(FINDINGS)}
        absent.append(_report(normal, [], i))
    for i, (sentence, item) in enumerate(_PRESENT[finding]):
        normal = {f: _ABSENT[f][(i + k) % 3] for k, f in enumerate(FINDINGS)}
        present.append(_report({**normal, finding: sentence}, [item], i))
    return absent, present


def zero_shot_classes(style: str = "report") -> dict:
    """``{finding: [absent prompts, present prompts]}`` for a ``zero_shot`` evaluator."""
    return {f: [list(p) for p in prompts(f, style)] for f in FINDINGS}
