"""Contrastive fine-tuning of a converted SigLIP checkpoint on MedSynth radiograph–report pairs.

Convert a Hugging Face SiglipModel directory first, then train from it:

    python -m medvl_jax.convert.from_hf --hf_dir HF_SIGLIP_DIR --out /tmp/siglip_ckpt
    python -m medvl_jax.train --config configs/siglip_finetune.py --workdir /tmp/siglip_ft \
        --config.init_from=/tmp/siglip_ckpt

The model, tokenizer, image size and text length come from the checkpoint
(:func:`medvl_jax.tasks.contrastive.resolve_config`; ``init_from`` may also be a contrastive
training workdir); the sigmoid loss, the bias and the
temperature continue from their pretrained values. Text is SigLIP-style: padded to the
checkpoint's text length, no attention mask. Images are rendered at 128 px and resized to the
checkpoint's size, 3 channels. No numbers are measured for this config (it needs a real
SigLIP checkpoint, which cannot be downloaded here).

`:smoke` runs a few steps on tiny data (still needs --config.init_from).
"""
import ml_collections

from medvl_jax.data import pipeline
from medvl_jax.data.medsynth import prompts
from medvl_jax.evaluate import evaluators
from medvl_jax.train import loop, optim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.init_from = ""                        # Required: a converted two-tower checkpoint dir.
    c.tokenizer = ""                        # "": the checkpoint's tokenizer/.
    c.model = ml_collections.ConfigDict()   # Empty: the checkpoint's model config.

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source(
        "cxr", num_studies=64 if smoke else 8000, render_size=128)}
    c.data.image_size = None                # None: the checkpoint's.
    c.data.channels = 3
    c.data.max_length = None                # None: the checkpoint's text length.
    c.data.batch_size = 8 if smoke else 64

    c.contrastive = {"loss": "siglip", "sentences": 0,  # Whole reports.
                     "text_mask": False,  # As SigLIP was trained: padded, no mask.
                     "embed_batch_size": 8 if smoke else 50}
    c.evals = evaluators.image_text(c.data.sources, studies=8 if smoke else 300,
                                    probe_studies=8 if smoke else 500,
                                    classes=prompts.zero_shot_classes("report"))

    c.optim = optim.default_config()
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 1 if smoke else 50
    c.optim.weight_decay = 1e-4

    c.train = loop.default_config()
    c.train.steps = 2 if smoke else 500
    c.train.log_every = 1 if smoke else 25
    c.train.checkpoint_every = 2 if smoke else 250
    return c
