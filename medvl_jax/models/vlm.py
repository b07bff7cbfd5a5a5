"""Vision-language model: vision encoder + projector + decoder.

Images are encoded, projected to the decoder width and placed, in order, at the positions of
``image_token_id`` in the token sequence (the k-th image token of a row gets the k-th image
feature of that row). Several images per example (``[B, N, H, W, C]``) and volumes
(``[B, N, D, H, W, C]``, with a tubelet vision config) are flattened over ``N``.

Param tree: ``vision/...`` (see vision.py), ``projector/...``, ``decoder/...`` (decoder.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.models.attention import set_tower_attention
from medvl_jax.models.decoder import Decoder, DecoderConfig
from medvl_jax.models.layers import RMSNorm, param_with_axes
from medvl_jax.models.masks import attn_mask as structured_mask
from medvl_jax.models.vision import VisionConfig, VisionEncoder

PROJECTORS = ("linear", "mlp2x_gelu", "gemma3")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """Hyper-parameters of :class:`VLM`.

    ``projector``: "linear" (PaliGemma), "mlp2x_gelu" (LLaVA: linear, exact GELU, linear) or
    "gemma3" (average-pool to ``mm_tokens_per_image`` tokens, RMSNorm, bias-free projection).
    ``drop_cls``: drop the first vision token (CLIP's class token, LLaVA's "default").
    ``image_bidirectional``: tokens of one image attend to each other both ways (Gemma 3).
    ``position_offset``: first position id (PaliGemma counts from 1).
    ``attention_impl``: when set, the ``attention_impl`` of both towers (else each keeps its
    own).
    """

    vision: VisionConfig
    text: DecoderConfig
    projector: str = "linear"
    image_token_id: int = 0
    mm_tokens_per_image: int = 0
    drop_cls: bool = False
    image_bidirectional: bool = False
    position_offset: int = 0
    attention_impl: str | None = None

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector {self.projector!r} not in {PROJECTORS}")
        set_tower_attention(self)


class Projector(nn.Module):
    """Maps vision tokens ``[B, T, Wv]`` to decoder embeddings ``[B, T', E]``."""

    config: VLMConfig

    @nn.compact
    def __call__(self, x):
        """Projects (and for "gemma3" pools) the vision tokens."""
        c = self.config
        wv, e = x.shape[-1], c.text.embed_dim  # Wider than the tower after token_merge.
        dt, pd = c.text.dtype, c.text.param_dtype
        init = nn.initializers.lecun_normal()

        def dense(name, h, din, dout, axes):
            w = param_with_axes(self, name, init, (din, dout), pd, axes)
            b = param_with_axes(self, name + "_bias", nn.initializers.zeros, (dout,), pd, axes[1:])
            return h.astype(dt) @ w.astype(dt) + b.astype(dt)

        if c.projector == "linear":
            return dense("linear", x, wv, e, ("vision_embed", "embed"))
        if c.projector == "mlp2x_gelu":
            h = jax.nn.gelu(dense("fc1", x, wv, e, ("vision_embed", "embed")), approximate=False)
            return dense("fc2", h, e, e, ("mlp", "embed"))
        b, n, _ = x.shape
        side = int(round(n ** 0.5))
        out_side = int(round(c.mm_tokens_per_image ** 0.5))
        if side * side != n or out_side ** 2 != c.mm_tokens_per_image or side % out_side:
            raise ValueError(f"cannot pool {n} vision tokens to {c.mm_tokens_per_image}")
        k = side // out_side
        x = x.reshape(b, out_side, k, out_side, k, wv).astype(jnp.float32).mean(axis=(2, 4))
        x = x.reshape(b, out_side * out_side, wv).astype(dt)
        x = RMSNorm(eps=c.vision.norm_eps, plus_one=True, axis_name="vision_embed", dtype=dt,
                    param_dtype=pd, name="norm")(x)
        w = param_with_axes(self, "kernel", nn.initializers.zeros, (wv, e), pd,
                            ("vision_embed", "embed"))
        return x @ w.astype(dt)


def image_groups(is_image: jnp.ndarray) -> jnp.ndarray:
    """``[B, L]`` ids: each contiguous run of image tokens gets its own id >= 1, text gets 0."""
    prev = jnp.pad(is_image[:, :-1], ((0, 0), (1, 0)))
    starts = is_image & ~prev
    return jnp.cumsum(starts, axis=1) * is_image


class VLM(nn.Module):
    """Vision encoder + projector + decoder; see the module docstring."""

    config: VLMConfig

    def setup(self):
        c = self.config
        self.vision = VisionEncoder(c.vision)
        self.projector = Projector(c)
        self.decoder = Decoder(c.text)

    def encode_images(self, images: jnp.ndarray) -> jnp.ndarray:
        """``[B, N, *image]`` -> projected features ``[B, N * T, E]``."""
        c = self.config
        b, n = images.shape[:2]
        tokens, aux = self.vision(images.reshape(b * n, *images.shape[2:]))
        if c.vision.feature_layer != -1:
            tokens = aux["features"]
        if c.drop_cls:
            tokens = tokens[:, 1:]
        feats = self.projector(tokens)
        return feats.reshape(b, n * feats.shape[1], feats.shape[2])

    def embed(self, tokens: jnp.ndarray, images: jnp.ndarray | None) -> jnp.ndarray:
        """Token embeddings with image features spliced in at the image-token positions."""
        c = self.config
        is_image = tokens == c.image_token_id
        x = self.decoder.embed(jnp.where(is_image, 0, tokens))
        if images is None:
            return x
        feats = self.encode_images(images).astype(x.dtype)
        idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
        gathered = jnp.take_along_axis(feats, idx[..., None], axis=1)
        return jnp.where(is_image[..., None], gathered, x)

    def __call__(self, tokens, images, *, input_mask, mask_ar, positions=None, attn_mask=None,
                 segment_ids=None, cache=None, decode=False, prefill=False):
        """Returns ``(logits, aux)`` like :class:`Decoder`.

        Args:
          tokens: int ``[B, L]`` with ``image_token_id`` where image features go.
          images: ``[B, N, H, W, C]`` or ``[B, N, D, H, W, C]``, or None (text only).
          input_mask: ``[B, L]`` True for real tokens.
          mask_ar: ``[B, L]`` 0 for the bidirectional prefix, 1 for causal tokens.
          positions: optional ``[B, L]``; default counts real tokens from ``position_offset``.
          attn_mask: optional bool ``[B, L, S]`` (or ``AttnMask``) replacing the mask built from
            ``mask_ar`` (needed with a cache, where keys are cache slots).
          segment_ids: optional ``[B, L]`` ids of packed examples (see
            ``medvl_jax.data.packing``): attention stays within a segment. Pass the packed
            ``positions`` with them (each segment counts from 0).
          cache, decode, prefill: as for :class:`Decoder` (a prefill builds its mask from
            ``mask_ar`` like a call without a cache).
        """
        c = self.config
        input_mask = jnp.asarray(input_mask).astype(bool)
        if positions is None:
            positions = jnp.cumsum(input_mask, axis=1) - 1 + c.position_offset
            positions = jnp.maximum(positions, 0)
        if attn_mask is None:
            groups = image_groups(tokens == c.image_token_id) if c.image_bidirectional else None
            attn_mask = structured_mask(input_mask, mask_ar, image_groups=groups,
                                        segment_ids=segment_ids)
        x = self.embed(tokens, images)
        return self.decoder(embeddings=x, positions=positions, attn_mask=attn_mask, cache=cache,
                            decode=decode, prefill=prefill)
