"""Attention masks built from a per-token `mask_ar` vector (prefix-LM, causal and block masks).

Conventions: a mask is bool ``[B, L, S]`` and True means "query may attend to key".

``mask_ar`` follows the big_vision scheme: tokens are grouped into blocks by the cumulative sum
of ``mask_ar``; a token attends to every token whose cumulative sum is <= its own. So a run of
zeros (an image + prompt prefix) attends bidirectionally within itself, and a run of ones is
causal. ``input_mask`` marks real tokens; padding is never attended to.
"""
from __future__ import annotations

import jax.numpy as jnp


def make_attn_mask(
    input_mask: jnp.ndarray,
    mask_ar: jnp.ndarray,
    *,
    image_groups: jnp.ndarray | None = None,
    sliding_window: int | None = None,
    segment_ids: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Builds a bool ``[B, L, L]`` attention mask.

    Args:
      input_mask: ``[B, L]`` bool/int, True for real tokens.
      mask_ar: ``[B, L]`` int/bool, 0 = part of the bidirectional block of the previous token,
        1 = starts a new (causal) block.
      image_groups: optional ``[B, L]`` int; tokens with the same positive id (for example the
        tokens of one image) additionally attend to each other in both directions, as in
        Gemma 3's layout where images are bidirectional inside an otherwise causal sequence.
      sliding_window: optional window ``W``: a query at index ``i`` then only sees keys at index
        ``j`` with ``i - j < W`` (indices, not positions, as in Hugging Face's sliding masks).
      segment_ids: optional ``[B, L]`` int of packed sequences (1, 2, ... per example in the
        row): tokens attend only within their own segment (block-diagonal).
    """
    input_mask = jnp.asarray(input_mask).astype(bool)
    cumsum = jnp.cumsum(jnp.asarray(mask_ar).astype(jnp.int32), axis=-1)
    mask = cumsum[:, None, :] <= cumsum[:, :, None]
    if image_groups is not None:
        groups = jnp.asarray(image_groups)
        same = (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] > 0)
        mask = mask | same
    if sliding_window is not None:
        mask = mask & sliding_window_mask(mask.shape[-2], mask.shape[-1], sliding_window)[None]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    return mask & input_mask[:, None, :] & input_mask[:, :, None]


def causal_mask(input_mask: jnp.ndarray) -> jnp.ndarray:
    """Plain causal mask ``[B, L, L]`` with padding removed (``mask_ar`` all ones)."""
    return make_attn_mask(input_mask, jnp.ones_like(jnp.asarray(input_mask), dtype=jnp.int32))


def sliding_window_mask(
    q_len: int, k_len: int, window: int | jnp.ndarray, q_offset: int | jnp.ndarray = 0
) -> jnp.ndarray:
    """Bool ``[q_len, k_len]``: True where ``(q_offset + i) - j < window`` (one-sided window)."""
    q_idx = jnp.arange(q_len)[:, None] + q_offset
    k_idx = jnp.arange(k_len)[None, :]
    return (q_idx - k_idx) < window
