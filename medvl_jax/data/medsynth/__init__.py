"""MedSynth: an embedded, procedurally generated synthetic medical dataset (no download).

Three kinds of study, each deterministic by (seed, split, index):

* ``cxr`` — chest-radiograph-like uint8 images [H, W] (field of view 320 mm, radiological
  convention: the patient's right on the image's left) with 0–3 nodules (15–30 mm), pleural
  effusion (none / left / right / both) and cardiomegaly (cardiothoracic ratio > 0.5).
* ``ct`` — chest-CT-like int16 volumes [D, H, W] in Hounsfield units (slice 0 cranial) with
  0–3 lung lesions (10–30 mm, +40..+80 HU).
* ``longitudinal`` — a prior and a current radiograph [2, H, W] of one patient with a nodule
  that is new, grown, resolved or stable.

Each record::

    {"id", "kind", "modality" ("xray" | "ct"), "image" (None when render=False),
     "spacing" (float32 mm: (row, col) or (z, y, x)), "report" (FINDINGS + IMPRESSION),
     "findings" (JSON of the structured findings), "qa" (list of {"question", "answer",
     "type", "template", "options"})}

Question types: closed (yes/no), open, multiple_choice (answer is the letter), counting,
size ("14 mm"), box ("[x0, y0, x1, y1]", integer percent of width/height from the top-left),
progression (new / grown / resolved / stable). Answers are balanced per template so that the
question text alone does not give them away.
"""
from medvl_jax.data.medsynth.source import (KINDS, SPLITS, MedSynthConfig, MedSynthSource,
                                            corpus, generate_study, study_seed)

__all__ = ["KINDS", "SPLITS", "MedSynthConfig", "MedSynthSource", "corpus", "generate_study",
           "study_seed"]
