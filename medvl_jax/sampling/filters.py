"""Logit filters and token choice for sampling: temperature, top-k, top-p (nucleus), greedy.

All knobs are traced values (not static), so changing them never recompiles. Conventions:

* ``temperature == 0`` means greedy (argmax of the unmodified logits).
* ``top_k <= 0`` disables top-k; otherwise tokens whose logit is below the k-th largest are
  removed (ties with the k-th largest are kept).
* ``top_p >= 1`` disables top-p; otherwise the kept set is the smallest prefix of tokens sorted
  by probability (after temperature and top-k) whose total probability reaches ``top_p``; the
  most likely token is always kept, and ties with the last kept token are kept.

Order as in Hugging Face: temperature, then top-k, then top-p.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def top_k_mask(logits: jnp.ndarray, top_k: jnp.ndarray) -> jnp.ndarray:
    """Bool mask ``[..., V]`` of the tokens kept by top-k (all of them when ``top_k <= 0``)."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(top_k, 1, vocab)
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None],
                              axis=-1)
    return jnp.where(top_k > 0, logits >= kth, True)


def top_p_mask(logits: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """Bool mask ``[..., V]`` of the tokens kept by nucleus sampling (see module docstring)."""
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(top_p < 1.0, logits >= threshold, True)


def filter_logits(logits: jnp.ndarray, temperature: jnp.ndarray, top_k: jnp.ndarray,
                  top_p: jnp.ndarray) -> jnp.ndarray:
    """Temperature-scaled logits with the tokens removed by top-k/top-p set to ``NEG_INF``.

    ``temperature`` must be > 0 here (greedy is handled by :func:`choose_tokens`).
    """
    scaled = logits.astype(jnp.float32) / temperature

    def masked(x):
        x = jnp.where(top_k_mask(x, top_k), x, NEG_INF)
        return jnp.where(top_p_mask(x, top_p), x, NEG_INF)

    # The sorts are skipped entirely when neither filter is active.
    return jax.lax.cond((top_k > 0) | (top_p < 1.0), masked, lambda x: x, scaled)


def choose_tokens(rng: jax.Array, logits: jnp.ndarray, temperature: jnp.ndarray,
                  top_k: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """Sampled token ids ``[B]`` from logits ``[B, V]``; argmax when ``temperature == 0``."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        t = jnp.maximum(temperature, 1e-6)
        filtered = filter_logits(logits, t, top_k, top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, lambda _: greedy, None)
