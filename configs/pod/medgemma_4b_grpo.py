"""Med-R1-style GRPO at full size: MedGemma 4B (Gemma 3 4B + SigLIP-400M at 896x896), groups of
eight completions of up to 512 tokens per question, full fine-tuning with the KL term.

A pod-scale config (model: medvl_jax.models.presets.gemma3_4b_vlm), planned before any pod or
checkpoint exists; the plan covers the update step and, separately, the rollout (prefill +
KV-cache decode of the whole rollout batch):

    python -m medvl_jax.plan --config configs/pod/medgemma_4b_grpo.py --topology v5p:2x2x2
    python -m medvl_jax.plan --config configs/pod/medgemma_4b_grpo.py --topology v5e:4x4

Training needs the SFT'd (or converted) checkpoint and its tokenizer
(``--config.init_from``, ``--config.tokenizer``) and Med-R1-format data (docs/data.md).
8 questions x 8 completions per rollout batch, prompts of 384 tokens (256 image tokens), bf16
compute, float32 weights and Adam moments, fsdp over every device. The measured plan is in
docs/tpu_pod.md.
"""
import ml_collections

from medvl_jax.data import pipeline
from medvl_jax.models import presets
from medvl_jax.tasks.grpo import GRPOTask
from medvl_jax.train import loop, optim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.task = "grpo"
    c.init_from = ""
    c.tokenizer = ""
    c.model = ml_collections.ConfigDict(presets.gemma3_4b_vlm(896, remat="full"))
    c.model.vision.dtype = "bfloat16"
    c.model.text.dtype = "bfloat16"

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source("cxr", num_studies=8000, seed=2)}
    c.data.batch_size = 64                  # Completions: 8 prompts x 8.
    c.data.max_images = 1
    c.data.image_size = 896
    c.data.num_image_tokens = 256
    c.data.channels = 3
    c.data.max_length = 384                 # Prompt tokens (left-padded).
    c.data.template = "gemma"

    c.grpo = GRPOTask.default_config()
    c.grpo.group_size = 8
    c.grpo.max_new_tokens = 512
    c.grpo.beta = 0.04

    c.optim = optim.default_config()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0

    c.train = loop.default_config()
    c.train.steps = 1000
    c.train.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
