"""Contrastive image-text model: a vision tower, a text tower and a learned temperature.

Parameter tree (the layout of Hugging Face's ``SiglipModel`` when there are no projections)::

    vision/...       VisionEncoder (2D images, or volumes/videos with tubelets)
    text/...         TextEncoder (SigLIP or BERT layout)
    img_proj [Wv, E], txt_proj [Wt, E]     (only with ``embed_dim``; no bias, as CLIP)
    logit_scale []   log of the inverse temperature
    logit_bias []    (sigmoid loss; absent for the CLIP initialisation)

Pairwise logits are ``img @ txt.T * exp(logit_scale) + logit_bias``
(:func:`pairwise_logits`), as SiglipModel's ``logits_per_image``.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from medvl_jax.models.layers import param_with_axes
from medvl_jax.models.text_encoder import TextEncoder, TextEncoderConfig
from medvl_jax.models.attention import set_tower_attention
from medvl_jax.models.vision import VisionConfig, VisionEncoder

# logit_init -> (logit_scale, logit_bias or None): SigLIP (t' = log 10, b = -10) and CLIP
# (temperature 0.07, no bias).
LOGIT_INITS = {"siglip": (math.log(10.0), -10.0), "clip": (math.log(1 / 0.07), None)}
IMAGE_POOLS = ("pooled", "mean")
TEXT_POOLS = ("pooled", "first", "last", "mean")


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    """Hyper-parameters of :class:`TwoTower`.

    ``embed_dim``: shared embedding width reached through projection heads; None = no heads
    (the towers' pooled outputs must then have equal widths, as in SigLIP).
    ``image_pool``: "pooled" (the vision tower's pooled output: SigLIP MAP head / CLIP class
    token) or "mean" (mean of the output tokens).
    ``text_pool``: "pooled" (the text tower's pooled output), "first" ([CLS] hidden state),
    "last" (last position) or "mean" (mean over real tokens).
    ``logit_init``: "siglip" (logit_scale = log 10, logit_bias = -10) or "clip"
    (logit_scale = log(1/0.07), no bias).
    ``attention_impl``: when set, the ``attention_impl`` of both towers (else each keeps its
    own).
    """

    vision: VisionConfig = dataclasses.field(
        default_factory=lambda: VisionConfig(use_head=True))
    text: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    embed_dim: int | None = None
    image_pool: str = "pooled"
    text_pool: str = "pooled"
    logit_init: str = "siglip"
    attention_impl: str | None = None

    def __post_init__(self):
        set_tower_attention(self)
        if self.image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool {self.image_pool!r} not in {IMAGE_POOLS}")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool {self.text_pool!r} not in {TEXT_POOLS}")
        if self.logit_init not in LOGIT_INITS:
            raise ValueError(f"logit_init {self.logit_init!r} not in {sorted(LOGIT_INITS)}")
        v = self.vision
        if self.image_pool == "pooled" and v.layout == "siglip" and not v.use_head:
            raise ValueError("image_pool='pooled' needs a SigLIP vision tower with use_head=True")
        if v.token_merge != 1 or v.feature_layer != -1:
            raise ValueError("the vision tower of a two-tower model uses token_merge=1 and "
                             "feature_layer=-1")
        if self.embed_dim is None and self.image_width != self.text_width:
            raise ValueError(f"without embed_dim the towers must output equal widths; got "
                             f"image {self.image_width}, text {self.text_width}")

    @property
    def image_width(self) -> int:
        """Width of the pooled image features, before any projection."""
        return self.vision.width

    @property
    def text_width(self) -> int:
        """Width of the pooled text features, before any projection."""
        return self.text.out_dim if self.text_pool == "pooled" else self.text.width

    @property
    def has_bias(self) -> bool:
        """Whether the model has a ``logit_bias`` parameter."""
        return LOGIT_INITS[self.logit_init][1] is not None


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """``x / ||x||`` over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)


def pairwise_logits(img_emb: jnp.ndarray, txt_emb: jnp.ndarray, logit_scale: jnp.ndarray,
                    logit_bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """``[Bi, Bt]`` logits ``img @ txt.T * exp(logit_scale) + logit_bias`` (logits_per_image)."""
    logits = jnp.einsum("id,td->it", img_emb, txt_emb) * jnp.exp(logit_scale)
    return logits if logit_bias is None else logits + logit_bias


class TwoTower(nn.Module):
    """Vision tower + text tower with L2-normalised embeddings and a learned temperature.

    ``encode_image(images)`` and ``encode_text(tokens, mask=None, token_types=None)`` return
    normalised embeddings ``[B, E]`` (call them with ``apply(..., method=...)``);
    ``__call__(images, tokens, mask=None, token_types=None)`` returns ``(img_emb, txt_emb,
    logit_scale, logit_bias)`` with ``logit_scale`` in log space and ``logit_bias`` None when
    the model has none.
    """

    config: TwoTowerConfig

    def setup(self):
        c = self.config
        self.vision = VisionEncoder(c.vision)
        self.text = TextEncoder(c.text)
        if c.embed_dim is not None:
            init = nn.initializers.lecun_normal()
            self.img_proj = param_with_axes(self, "img_proj", init, (c.image_width, c.embed_dim),
                                            c.vision.param_dtype, ("vision_embed", None))
            self.txt_proj = param_with_axes(self, "txt_proj", init, (c.text_width, c.embed_dim),
                                            c.text.param_dtype, ("vision_embed", None))
        scale, bias = LOGIT_INITS[c.logit_init]
        self.logit_scale = param_with_axes(self, "logit_scale", nn.initializers.constant(scale),
                                           (), jnp.float32, ())
        self.logit_bias = (None if bias is None else param_with_axes(
            self, "logit_bias", nn.initializers.constant(bias), (), jnp.float32, ()))

    def encode_image(self, images):
        """L2-normalised embeddings ``[B, E]`` of ``[B, H, W, C]`` or ``[B, T, H, W, C]``."""
        c = self.config
        tokens, aux = self.vision(images)
        x = aux["pooled"] if c.image_pool == "pooled" else tokens.mean(axis=1)
        if c.embed_dim is not None:
            x = x.astype(c.vision.dtype) @ self.img_proj.astype(c.vision.dtype)
        return l2_normalize(x)

    def encode_text(self, tokens, mask=None, token_types=None):
        """L2-normalised text embeddings ``[B, E]``; ``mask`` 1 = real token."""
        c = self.config
        hidden, pooled = self.text(tokens, mask, token_types)
        if c.text_pool == "pooled":
            x = pooled
        elif c.text_pool == "first":
            x = hidden[:, 0]
        elif c.text_pool == "last":
            x = hidden[:, -1]
        else:
            m = (jnp.ones(tokens.shape, hidden.dtype) if mask is None
                 else mask.astype(hidden.dtype))[..., None]
            x = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1)
        if c.embed_dim is not None:
            x = x.astype(c.text.dtype) @ self.txt_proj.astype(c.text.dtype)
        return l2_normalize(x)

    def __call__(self, images, tokens, mask=None, token_types=None):
        """``(img_emb [Bi, E], txt_emb [Bt, E], logit_scale [], logit_bias [] or None)``."""
        img = self.encode_image(images)
        txt = self.encode_text(tokens, mask, token_types)
        return img, txt, self.logit_scale, self.logit_bias
