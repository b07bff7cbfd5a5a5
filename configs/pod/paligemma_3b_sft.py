"""PaliGemma 3B (Gemma 2B + SigLIP-400M) at 448x448 supervised fine-tuning at full size.

A pod-scale config (model: medvl_jax.models.presets.paligemma_3b_vlm), planned before any pod
or checkpoint exists:

    python -m medvl_jax.plan --config configs/pod/paligemma_3b_sft.py --topology v5p:2x2x1
    python -m medvl_jax.plan --config configs/pod/paligemma_3b_sft.py --topology v5e:2x4

Training needs the converted 448 checkpoint and its tokenizer (docs/finetune.md):
``--config.init_from=/ckpt/paligemma448 --config.tokenizer=/ckpt/paligemma448``.
Global batch 64 examples of 1,280 tokens (1,024 image tokens, prefix-LM), bf16 compute with
float32 weights and Adam moments, fsdp over every device, layers scanned and rematerialised.
The measured plan is in docs/tpu_pod.md.
"""
import ml_collections

from medvl_jax.models import presets
from medvl_jax.tasks import sft


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = sft.finetune_config(smoke=False, template="gemma", prefix_lm=True, max_length=1280,
                            lr=1e-5, steps=2000)
    c.model = ml_collections.ConfigDict(presets.paligemma_3b_vlm(448, remat="full"))
    c.model.vision.dtype = "bfloat16"
    c.model.text.dtype = "bfloat16"
    c.data.image_size = 448
    c.data.num_image_tokens = 1024
    c.data.batch_size = 64
    c.train.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
