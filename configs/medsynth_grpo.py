"""MedSynth GRPO: RL with verifiable rewards on a MedSynth SFT model's chest radiographs (CPU).

Commands (after configs/medsynth_sft.py; the SFT workdir is exported to a checkpoint directory
once by ``medvl_jax.convert.workdir.resolve``):

    python -c "from medvl_jax.convert import workdir; print(workdir.resolve('/tmp/medsynth_sft'))"
    python -m medvl_jax.train --config configs/medsynth_grpo.py --workdir /tmp/medsynth_grpo \
        --config.init_from=/tmp/medsynth_sft/export/step_500

Each step samples 4 answers (temperature 1) to each of 8 questions with exact answers (closed,
multiple choice, counting) on new studies, scores them with the accuracy reward, normalises the
rewards within each group and takes one clipped-ratio update with a k3 KL to the SFT model
(beta 0.04). The log shows reward, accuracy per reward function, completion length in tokens,
KL, clip fraction, entropy and the sampler/trainer log-prob gap (~1e-6 in float32); at the end
the per-question-type test table is printed with the starting model's scores (before) and the
trained model's scores without images. Measured from the main job's checkpoint (2026-11-29,
3.6 min on 2 CPU cores): closed 96.7% -> 96.0%, counting 84.5% -> 84.0%, multiple choice
24.3% -> 24.9%, overall -0.3 points on 1,067 test questions (no image: 36.5%). Training on
multiple choice, counting and size instead (group of 8, lr 3e-5): -0.5 points on 1,220
(counting -4.3, multiple choice +0.8, size +1.5). The target of +3 points is not reached;
see docs/post_training.md.

`:smoke` runs a few steps on tiny data (used by tests).
"""
import ml_collections

from medvl_jax.data import pipeline
from medvl_jax.tasks import grpo
from medvl_jax.train import loop, optim

TYPES = ("closed", "multiple_choice", "counting")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.task = "grpo"
    c.init_from = ""                        # Required: the SFT checkpoint directory.
    c.tokenizer = ""                        # "": the checkpoint's tokenizer/.
    c.model = ml_collections.ConfigDict()   # Empty: the checkpoint's model config.

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source(
        "cxr", num_studies=32 if smoke else 8000, seed=2, render_size=64,
        question_types=TYPES)}  # Seed 2: not the SFT studies; rendered as in the SFT job.
    c.data.batch_size = 8 if smoke else 32  # Completions: prompts x grpo.group_size.
    c.data.max_images = 1
    c.data.image_size = None                # None: the checkpoint's.
    c.data.num_image_tokens = None          # None: the checkpoint's.
    c.data.channels = 1
    c.data.max_length = 128                 # Prompt tokens (left-padded).
    c.data.template = "gemma"               # As the SFT run.
    c.data.prefix_lm = True                 # As the SFT run.

    c.grpo = grpo.default_config()
    c.grpo.group_size = 4
    c.grpo.max_new_tokens = 8
    c.grpo.beta = 0.04
    c.grpo.eval_studies = 0 if smoke else 200  # 1,100 test questions of the three types.

    c.optim = optim.default_config()
    c.optim.lr = 1e-5 if smoke else 2e-5
    c.optim.warmup_steps = 1 if smoke else 10
    c.optim.weight_decay = 0.0

    c.train = loop.default_config()
    c.train.steps = 4 if smoke else 150
    c.train.log_every = 1 if smoke else 10
    c.train.checkpoint_every = 2 if smoke else 50
    return c
