"""LLaVA-1.5 7B (Vicuna-7B + CLIP ViT-L/14 at 336) instruction tuning at full size, the
LLaVA-Med recipe's shape (global batch 128, 2,048 tokens, full fine-tuning).

A pod-scale config (model: medvl_jax.models.presets.llava_7b_vlm), planned before any pod or
checkpoint exists:

    python -m medvl_jax.plan --config configs/pod/llava_7b_sft.py --topology v5p:2x2x4
    python -m medvl_jax.plan --config configs/pod/llava_7b_sft.py --topology v5e:8x8

Training needs the converted checkpoint and tokenizer (docs/finetune.md), LLaVA-format data
(docs/data.md) and a chat template whose markers the tokenizer holds (``data.template``;
Vicuna's own format is not one of them). bf16 compute with float32 weights and Adam moments, fsdp over every device,
layers scanned and rematerialised; the vision tower is frozen, as in LLaVA. The measured plan
is in docs/tpu_pod.md.
"""
import ml_collections

from medvl_jax.models import presets
from medvl_jax.tasks import sft


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = sft.finetune_config(smoke=False, template="llama3", prefix_lm=False, max_length=2048,
                            lr=2e-5, steps=5000)
    c.model = ml_collections.ConfigDict(presets.llava_7b_vlm(remat="full"))
    c.model.vision.dtype = "bfloat16"
    c.model.text.dtype = "bfloat16"
    c.data.image_size = 336
    c.data.num_image_tokens = 576
    c.data.batch_size = 128
    c.optim.freeze = "^vision/"
    c.train.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
