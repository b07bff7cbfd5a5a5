"""MedSigLIP-style contrastive pretraining at full size: SigLIP So400m/14 image and text towers
at 448x448, sigmoid loss over a global batch of 32,768 image-report pairs, computed as a ring
over the devices (the batch's similarity matrix is never gathered).

A pod-scale config (model: medvl_jax.models.presets.medsiglip_448), planned before any pod or
checkpoint exists:

    python -m medvl_jax.plan --config configs/pod/medsiglip_contrastive.py --topology v5p:4x4x8
    python -m medvl_jax.plan --config configs/pod/medsiglip_contrastive.py --topology v5e:16x16 \
        --config.data.batch_size=8192

Reports cut to 64 tokens; bf16 compute, float32 weights and Adam moments, fsdp over groups of
64 chips and data parallel across them, layers scanned and rematerialised. A contrastive loss
cannot accumulate gradients (each microbatch would contrast only its own examples), so the
per-chip batch is the global batch over the chips: 32k needs 128 v5p chips (256 images per
chip); 256 v5e chips (the largest v5e slice) hold 8k, not 32k. The measured plans are in
docs/tpu_pod.md.
"""
import ml_collections

from medvl_jax.data import pipeline
from medvl_jax.models import presets
from medvl_jax.train import loop, optim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.task = "contrastive"
    c.tokenizer = ""
    c.model = ml_collections.ConfigDict(presets.medsiglip_448(remat="full"))
    c.model.vision.dtype = "bfloat16"
    c.model.text.dtype = "bfloat16"

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source("cxr", num_studies=1_000_000)}
    c.data.batch_size = 32768
    c.data.image_size = 448
    c.data.channels = 3
    c.data.max_length = 64

    c.contrastive = {"loss": "siglip", "sentences": 0, "sharded": True, "sharded_impl": "ring"}

    c.optim = optim.default_config()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 1e-4

    c.train = loop.default_config()
    c.train.steps = 100_000
    # fsdp 64: the towers' 1,152-wide weights split evenly (1152 = 64 x 18); data over the
    # rest (2 on 128 chips, 4 on 256).
    c.train.mesh = {"data": -1, "fsdp": 64, "tensor": 1}
    return c
