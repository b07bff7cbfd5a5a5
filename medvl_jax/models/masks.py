"""Attention masks built from a per-token `mask_ar` vector (prefix-LM, causal and block masks).

Conventions: a mask is bool ``[B, L, S]`` and True means "query may attend to key".
:class:`AttnMask` carries such an array together with the mask's structure (causal, the last key
each query may see, segment ids, sliding window), which is what fused attention kernels take;
:func:`attn_mask` builds one from the same inputs as :func:`make_attn_mask`.

``mask_ar`` follows the big_vision scheme: tokens are grouped into blocks by the cumulative sum
of ``mask_ar``; a token attends to every token whose cumulative sum is <= its own. So a run of
zeros (an image + prompt prefix) attends bidirectionally within itself, and a run of ones is
causal. ``input_mask`` marks real tokens; padding is never attended to.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

# Segment ids of padding tokens (real tokens carry ids >= 0).
PAD_SEGMENT = -1


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


@flax.struct.dataclass
class AttnMask:
    """Which keys each query may see, as a dense array and as structure.

    Query ``i`` of row ``b`` may see key ``j`` when all of these that are set hold:

    - ``j <= last_key[b, i]`` (``[B, L]`` int; the end of ``i``'s bidirectional block: a
      prefix-LM prefix, an image; ``last_key[b, i] >= i``), or without ``last_key``, ``j <= i``
      when ``causal``;
    - ``q_segments[b, i] == kv_segments[b, j]`` (``[B, L]``/``[B, S]`` int: packed examples,
      padding);
    - ``i - j < window`` on layers where ``local`` (a bool, traced under ``nn.scan``) is True.

    ``dense`` (bool ``[B, L or 1, S]``, None = every key) says the same without the window
    (see :meth:`dense_mask`); it is what the XLA path uses. The structure agrees with it on
    every query row that sees at least one key; on rows that see none (padding) the output is
    unspecified. ``structured=False`` marks a mask known only as its dense array.
    """

    dense: Any = None
    q_segments: Any = None
    kv_segments: Any = None
    last_key: Any = None
    local: Any = False
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    window: int | None = flax.struct.field(pytree_node=False, default=None)
    structured: bool = flax.struct.field(pytree_node=False, default=True)

    @classmethod
    def from_dense(cls, mask: jnp.ndarray) -> "AttnMask":
        """A mask known only as a bool ``[B, L, S]`` array."""
        return cls(dense=jnp.asarray(mask).astype(bool), structured=False)

    @property
    def kind(self) -> str:
        """"dense" (no structure), "rows" (``last_key``), "causal" or "full"."""
        if not self.structured:
            return "dense"
        if self.last_key is not None:
            return "rows"
        return "causal" if self.causal else "full"

    def dense_mask(self) -> jnp.ndarray | None:
        """``dense`` with the sliding window applied where ``local``."""
        if self.window is None or self.dense is None:
            return self.dense
        d = self.dense
        win = sliding_window_mask(d.shape[-2], d.shape[-1], self.window)[None]
        return jnp.where(self.local, d & win, d)


def last_keys(mask_ar: jnp.ndarray, image_groups: jnp.ndarray | None = None) -> jnp.ndarray:
    """``[B, L]`` index of the last key each token may see under :func:`make_attn_mask`'s rules:
    the end of its ``mask_ar`` block, or of its image group when that ends later. Image groups
    must be contiguous runs (as ``vlm.image_groups`` makes them)."""
    cumsum = jnp.cumsum(jnp.asarray(mask_ar).astype(jnp.int32), axis=-1)
    # Blocks are runs of equal cumsum: the last index whose cumsum is <= the token's own.
    last = jax.vmap(lambda c: jnp.searchsorted(c, c, side="right"))(cumsum) - 1
    if image_groups is not None:
        g = jnp.asarray(image_groups)
        idx = jnp.arange(g.shape[-1])
        nxt = jnp.pad(g[:, 1:], ((0, 0), (0, 1)))
        run_end = jnp.where((g > 0) & (nxt != g), idx, g.shape[-1])
        run_end = jax.lax.cummin(run_end, axis=1, reverse=True)
        last = jnp.maximum(last, jnp.where(g > 0, run_end, -1))
    return last.astype(jnp.int32)


def attn_mask(
    input_mask: jnp.ndarray,
    mask_ar: jnp.ndarray | None = None,
    *,
    image_groups: jnp.ndarray | None = None,
    segment_ids: jnp.ndarray | None = None,
) -> AttnMask:
    """:func:`make_attn_mask`'s mask with its structure; ``mask_ar=None`` is plain causal.

    Segment ids are those of packed rows (>= 0); padding gets :data:`PAD_SEGMENT`.
    """
    input_mask = jnp.asarray(input_mask).astype(bool)
    ar = jnp.ones(input_mask.shape, jnp.int32) if mask_ar is None else mask_ar
    dense = make_attn_mask(input_mask, ar, image_groups=image_groups, segment_ids=segment_ids)
    seg = jnp.zeros(input_mask.shape, jnp.int32) if segment_ids is None else segment_ids
    seg = jnp.where(input_mask, jnp.asarray(seg).astype(jnp.int32), PAD_SEGMENT)
    last = None
    if mask_ar is not None or image_groups is not None:
        last = last_keys(ar, image_groups)
    return AttnMask(dense=dense, q_segments=seg, kv_segments=seg, last_key=last,
                    causal=last is None)


def key_padding_mask(mask: jnp.ndarray) -> AttnMask:
    """Bidirectional attention over the real keys of ``mask`` ``[B, S]`` (True = real): every
    query, padding included, sees every real key (the text encoders' mask)."""
    mask = jnp.asarray(mask).astype(bool)
    return AttnMask(dense=mask[:, None, :], q_segments=jnp.zeros(mask.shape, jnp.int32),
                    kv_segments=jnp.where(mask, 0, PAD_SEGMENT))
