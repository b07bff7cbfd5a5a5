"""MedSynth SFT: a small VLM trained from scratch on MedSynth chest radiographs (CPU).

Command (the README's main job):

    python -m medvl_jax.train --config configs/medsynth_sft.py --workdir /tmp/medsynth_sft

`:smoke` runs a few steps on tiny data in seconds (used by tests).
"""
import ml_collections

from medvl_jax.data import pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.tokenizer = "medsynth"

    c.data = pipeline.default_config()
    c.data.sources = {
        "cxr": pipeline.medsynth_source("cxr", num_studies=64 if smoke else 8000, weight=3.0),
        "pairs": pipeline.medsynth_source("longitudinal", num_studies=32 if smoke else 2000),
    }
    c.data.batch_size = 8 if smoke else 32
    c.data.max_images = 2
    c.data.image_size = 64
    c.data.channels = 1
    c.data.num_image_tokens = 16
    c.data.max_length = 96
    return c
