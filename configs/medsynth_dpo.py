"""MedSynth DPO: preference optimisation of a MedSynth SFT model on chest radiographs (CPU).

Command (after configs/medsynth_sft.py; ``init_from`` is its workdir, or any checkpoint
directory):

    python -m medvl_jax.train --config configs/medsynth_dpo.py --workdir /tmp/medsynth_dpo \
        --config.init_from=/tmp/medsynth_sft

Pairs (medvl_jax.data.preferences): the starting model's own mistakes. Before training it
answers the counting and nodule-size questions of 1,000 training studies four times each at
temperature 1 (45 s); every answer scored wrong becomes a rejected answer, the
reference answer the chosen one (2,676 pairs from 7,012 answers). Then 200 steps of 16 pairs,
beta 0.1 plus RPO's NLL term on the chosen answers (weight 1), lr 5e-5, the vision tower
frozen (as in the SFT run). The loss starts at log 2 + the chosen answers' NLL (the policy is
the reference); at the end the per-question-type table of 600 test studies is printed with
the starting model's scores (before) and the no-image scores.

Measured from the two-stage main job's checkpoint (2026-11-29, 2 CPU cores, 3.8 min with the
mining and the three evaluations): counting 78.3% -> 79.8% (+1.5), size 58.1% -> 67.7%
(+9.6), overall 69.8% -> 74.7% (+4.9 points) on 1,039 test questions; without images 30.9%
(size 40.1%: the gain reads the image); other seeds (train.seed=1, data.seed=1): +5.6.
Compared on the same questions (docs/post_training.md): SFT on them with the same steps and
lr, +0.6; no NLL term, +0.9; greedy mistakes only (one answer per question), -23.6 (the
model learns to leave its usual answers); the synthetic text and visual pairs
(``dpo.mistake_fraction=0``) on these two types, +3.8 (no-image size 50.6%: more of it a
guess), on all question types -1.3.

With LoRA (``lora.rank > 0``) set ``--config.optim.freeze=`` so that LoRA freezes the whole
base (its reference).

`:smoke` runs a few steps on tiny data in seconds (used by tests), standalone from a random
policy of the SFT smoke model (its own reference), or from ``--config.init_from`` an SFT smoke
workdir.
"""
import ml_collections

import os

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.evaluate import evaluators
from medvl_jax.train import loop, optim

TYPES = ("counting", "size")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.init_from = ""                        # The SFT workdir or checkpoint to start from.
    c.tokenizer = ""                        # "": the checkpoint's tokenizer.
    c.model = ml_collections.ConfigDict()   # Empty: the checkpoint's model config.
    if smoke:  # Standalone: the SFT smoke model, random (or --config.init_from its workdir).
        sft = config_lib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                       "medsynth_sft.py:smoke"))
        c.tokenizer, c.model = sft.tokenizer, sft.model

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source(  # Seed 3: not the SFT studies.
        "cxr", num_studies=32 if smoke else 8000, seed=3, render_size=64,
        question_types=TYPES)}
    c.data.batch_size = 8 if smoke else 16
    c.data.max_images = 1
    c.data.image_size = 64 if smoke else None          # None: the checkpoint's.
    c.data.num_image_tokens = 16 if smoke else None    # None: the checkpoint's.
    c.data.channels = 1
    c.data.max_length = 128                 # 64 image tokens + one question and answer.
    c.data.template = "gemma"               # As the SFT run.
    c.data.prefix_lm = True                 # As the SFT run.

    c.dpo = ml_collections.ConfigDict()     # The rest: the task's defaults.
    c.dpo.beta = 0.1
    c.dpo.nll_weight = 1.0
    c.dpo.mistake_fraction = 1.0            # Only the starting model's own mistakes.
    c.dpo.mistake_studies = 2 if smoke else 1000
    c.dpo.mistake_samples = 4
    c.dpo.mistake_temperature = 1.0
    # 1,039 test questions of the two types, answered by the trained model, the starting
    # model (before) and the trained model without images (no_image).
    c.evals = {"test": evaluators.vqa(c.data.sources, studies=1 if smoke else 600,
                                      batch_size=8 if smoke else 64, compare_start=True,
                                      baselines=("no_image",))}

    c.optim = optim.default_config()
    c.optim.lr = 1e-5 if smoke else 5e-5
    c.optim.warmup_steps = 1 if smoke else 20
    c.optim.weight_decay = 0.0
    if not smoke:
        c.optim.freeze = "^vision/"         # As the SFT run: the tower stays as it is.

    c.train = loop.default_config()
    c.train.steps = 3 if smoke else 200
    c.train.log_every = 1 if smoke else 10
    c.train.checkpoint_every = 3 if smoke else 100
    return c
