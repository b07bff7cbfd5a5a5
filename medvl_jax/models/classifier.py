"""A multi-label image classifier: a ViT and one linear layer over all its output tokens.

Parameters: ``{"vision": <VisionEncoder params>, "head": {"kernel" [N * W, K], "bias" [K]}}``,
so a trained tower starts a VLM as-is (``config.vision_init``). The head reads every token
(flattened, not pooled), so each label can look at its own region of the image: findings
that are named by where they are (a nodule in the right upper zone) stay learnable. Pooled
tokens lose where: on MedSynth a mean-pooled or attention-pooled (MAP) head stays at the base
rate for nodules per lung zone after 200 steps, where the flattened head reaches 97%.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from medvl_jax.models.vision import VisionConfig, VisionEncoder


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """The tower and the number of labels."""
    vision: VisionConfig
    num_labels: int

    def __post_init__(self):
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")


class ImageClassifier(nn.Module):
    """Images ``[B, H, W, C]`` (or volumes with tubelets) → label logits ``[B, K]``."""

    config: ClassifierConfig

    @nn.compact
    def __call__(self, images):
        c = self.config
        tokens, _ = VisionEncoder(c.vision, name="vision")(images)
        flat = tokens.reshape(tokens.shape[0], -1).astype(jnp.float32)
        return nn.Dense(c.num_labels, name="head", kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(flat)
