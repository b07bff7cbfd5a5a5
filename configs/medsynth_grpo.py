"""MedSynth GRPO: RL with verifiable rewards on a MedSynth SFT model's chest radiographs (CPU).

Commands (after configs/medsynth_sft.py; ``init_from`` is its workdir, or any checkpoint
directory):

    python -m medvl_jax.train --config configs/medsynth_grpo.py --workdir /tmp/medsynth_grpo \
        --config.init_from=/tmp/medsynth_sft

Each step samples 8 answers (temperature 1) to each of 4 questions with checkable answers
(counting, and nodule sizes scored within 20% or 2 mm) on new studies, scores them with the
accuracy reward, normalises the rewards within each group and takes one clipped-ratio update
of the language model and projector (the vision tower stays frozen, as in the SFT run) with a
k3 KL to the SFT model (beta 0.04); 300 steps. The log shows reward, accuracy per reward
function, completion length in tokens, KL, clip fraction, entropy and the sampler/trainer
log-prob gap (~1e-6 in float32); at the end the per-question-type table on the questions of
600 test studies is printed with the starting model's scores (before) and the trained model's
scores without images.

Measured from the main job's checkpoint (2026-11-29, 2 CPU cores, 7.2 min with the three
evaluations): counting 82.0% -> 83.7% (+1.7), size 58.3% -> 66.0% (+7.7), overall 71.8% ->
76.1% (+4.3 points) on 1,053 test questions; without images 39.4% (size 59.2%: much of the
size gain is a better-placed guess, the rest reads the image). Other seeds (train.seed=1,
data.seed=1; 6.4 min): counting +0.3, size +8.8, overall +4.0 points. Questions the SFT model
already answers from the image (closed 96.7%) or cannot answer at all (multiple choice at
its 25% chance) give GRPO little to work with: training on closed, multiple choice and
counting moved the overall score by -0.3 points, on multiple choice, counting and size by
-0.5 (docs/post_training.md).

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
    c.task = "grpo"
    c.init_from = ""                        # The SFT workdir or checkpoint to start from.
    c.tokenizer = ""                        # "": the checkpoint's tokenizer.
    c.model = ml_collections.ConfigDict()   # Empty: the checkpoint's model config.
    if smoke:  # Standalone: the SFT smoke model, random (or --config.init_from its workdir).
        sft = config_lib.load_config_file(os.path.join(os.path.dirname(__file__),
                                                       "medsynth_sft.py:smoke"))
        c.tokenizer, c.model = sft.tokenizer, sft.model

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source(
        "cxr", num_studies=32 if smoke else 8000, seed=2, render_size=64,
        question_types=TYPES)}  # Seed 2: not the SFT studies; rendered as in the SFT job.
    c.data.batch_size = 8 if smoke else 32  # Completions: prompts x grpo.group_size.
    c.data.max_images = 1
    c.data.image_size = 64 if smoke else None          # None: the checkpoint's.
    c.data.num_image_tokens = 16 if smoke else None    # None: the checkpoint's.
    c.data.channels = 1
    c.data.max_length = 128                 # Prompt tokens (left-padded).
    c.data.template = "gemma"               # As the SFT run.
    c.data.prefix_lm = True                 # As the SFT run.

    c.grpo = ml_collections.ConfigDict()    # The rest: the task's defaults.
    c.grpo.group_size = 4 if smoke else 8
    c.grpo.max_new_tokens = 8
    c.grpo.beta = 0.04
    # 1,053 test questions of the two types, answered by the trained model, the starting
    # model (before) and the trained model without images (no_image).
    c.evals = {"test": evaluators.vqa(c.data.sources, studies=1 if smoke else 600,
                                      batch_size=8 if smoke else 64, compare_start=True,
                                      baselines=("no_image",))}

    c.optim = optim.default_config()
    c.optim.lr = 1e-5 if smoke else 2e-5
    c.optim.warmup_steps = 1 if smoke else 10
    c.optim.weight_decay = 0.0
    if not smoke:
        c.optim.freeze = "^vision/"         # As the SFT run: the tower stays as it is.

    c.train = loop.default_config()
    c.train.steps = 4 if smoke else 300
    c.train.log_every = 1 if smoke else 10
    c.train.checkpoint_every = 2 if smoke else 100
    return c
