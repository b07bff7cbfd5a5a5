"""MedSynth DPO: preference optimisation of a MedSynth SFT model on chest radiographs (CPU).

Command (after configs/medsynth_sft.py; an SFT workdir is exported to a checkpoint directory
with ``medvl_jax.convert.workdir.resolve``, which writes ``<workdir>/export/step_<N>``):

    python -c "from medvl_jax.convert import workdir; print(workdir.resolve('/tmp/medsynth_sft'))"
    python -m medvl_jax.train --config configs/medsynth_dpo.py --workdir /tmp/medsynth_dpo \
        --config.init_from=/tmp/medsynth_sft/export/step_500

Pairs (medvl_jax.data.preferences): half text hallucinations (a wrong answer of the same
question type), half visual ones (the right answer on the image whose nodules were noised
away), beta 0.1, 200 steps of batch 16, lr 1e-5, the vision tower frozen (as in the SFT run).
Expected: the DPO loss starts at log 2 = 0.693 (the policy is the reference) and the reward
accuracy rises above 0.5; then the per-question-type test table is printed as for SFT, with
the starting model's scores (before) and the no-image scores. Measured from the two-stage main
job's checkpoint (2026-11-29, 2 CPU cores): -1.3 points overall on 519 test questions (closed
-0.7, multiple choice -3.9, size -7.0, box +2.3); at lr 5e-5 with the tower trained: -4.4
(counting -13.3, open -7.6). DPO on these pairs does not raise MedSynth accuracy; see
docs/post_training.md. With LoRA (``lora.rank > 0``) set ``--config.optim.freeze=`` so that
LoRA freezes the whole base (its reference).

`:smoke` runs a few steps on tiny data in seconds (used by tests).
"""
import ml_collections

from medvl_jax.data import pipeline
from medvl_jax.tasks import dpo
from medvl_jax.train import loop, optim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.init_from = ""                        # Required: the SFT checkpoint directory.
    c.tokenizer = ""                        # "": the checkpoint's tokenizer/.
    c.model = ml_collections.ConfigDict()   # Empty: the checkpoint's model config.

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source(  # Seed 3: not the SFT studies.
        "cxr", num_studies=32 if smoke else 8000, seed=3, render_size=64)}
    c.data.batch_size = 8 if smoke else 16
    c.data.max_images = 1
    c.data.image_size = None                # None: the checkpoint's.
    c.data.num_image_tokens = None          # None: the checkpoint's.
    c.data.channels = 1
    c.data.max_length = 128                 # 64 image tokens + one question and answer.
    c.data.template = "gemma"               # As the SFT run.
    c.data.prefix_lm = True                 # As the SFT run.

    c.dpo = dpo.default_config()
    c.dpo.beta = 0.1
    c.dpo.eval_studies = 0 if smoke else 60

    c.optim = optim.default_config()
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 1 if smoke else 20
    c.optim.weight_decay = 0.0
    if not smoke:
        c.optim.freeze = "^vision/"         # As the SFT run: the tower stays as it is.

    c.train = loop.default_config()
    c.train.steps = 3 if smoke else 200
    c.train.log_every = 1 if smoke else 10
    c.train.checkpoint_every = 3 if smoke else 100
    return c
