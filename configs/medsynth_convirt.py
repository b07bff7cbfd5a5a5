"""MedSynth ConVIRT: contrastive image–report pretraining from scratch with ConVIRT's loss (CPU).

Command:

    python -m medvl_jax.train --config configs/medsynth_convirt.py --workdir /tmp/medsynth_convirt

The model and data of configs/medsynth_siglip.py (tiny two-tower model, 64x64 radiographs
paired with one random report sentence per epoch, as in ConVIRT), trained with ConVIRT's
asymmetric InfoNCE loss: fixed temperature 0.1, lambda 0.75 on the image->text term. At the
end the MedSynth test table is printed and written to <workdir>/results.json.
Not measured yet (see docs/contrastive.md).

`:smoke` runs a few steps on tiny data in seconds (used by tests).
"""
import os

import ml_collections

from medvl_jax import config as config_lib
from medvl_jax.data.medsynth import prompts

_SIGLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "medsynth_siglip.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(_SIGLIP + (f":{arg}" if arg else ""))
    c.contrastive.loss = "convirt"
    c.contrastive.sentences = 1           # One random report sentence per pair and epoch.
    c.evals.zero_shot.classes = prompts.zero_shot_classes("sentence")  # Sentences, not reports.
    c.data.max_length = 24                # A report sentence is at most 17 tokens.
    c.model.text.max_len = 24
    c.contrastive.convirt_temperature = 0.1
    c.contrastive.convirt_lambda = 0.75
    c.model.logit_init = "clip"  # No bias; ConVIRT's temperature is fixed (not the model's).
    c.optim.lr_groups = {}
    return c
