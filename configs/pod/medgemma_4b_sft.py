"""MedGemma 4B (Gemma 3 4B + SigLIP-400M at 896x896) supervised fine-tuning at full size.

A pod-scale config: its model section is the released architecture
(medvl_jax.models.presets.gemma3_4b_vlm), so the step can be planned before any pod or
checkpoint exists:

    python -m medvl_jax.plan --config configs/pod/medgemma_4b_sft.py --topology v5p:2x2x2
    python -m medvl_jax.plan --config configs/pod/medgemma_4b_sft.py --topology v5e:4x4

Training it needs the converted weights and their tokenizer (docs/finetune.md), and data at
896x896 (``data.sources``):

    python -m medvl_jax.train --config configs/pod/medgemma_4b_sft.py \
        --config.init_from=/ckpt/medgemma --config.tokenizer=/ckpt/medgemma --workdir ...

Global batch 64 examples of 512 tokens (one image: 256 image tokens), bf16 compute with
float32 weights and Adam moments, every device on fsdp, layers scanned. The measured plan
(memory per device, estimated MFU, collectives) is in docs/tpu_pod.md.
"""
import ml_collections

from medvl_jax.models import presets
from medvl_jax.tasks import sft


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = sft.finetune_config(smoke=False, template="gemma", prefix_lm=False, max_length=512,
                            lr=1e-5, steps=2000)
    c.model = ml_collections.ConfigDict(presets.gemma3_4b_vlm(896, remat="full"))
    c.model.vision.dtype = "bfloat16"
    c.model.text.dtype = "bfloat16"
    c.data.image_size = 896
    c.data.num_image_tokens = 256
    c.data.batch_size = 64
    c.train.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
