"""Token-level losses shared by the tasks (pure functions of logits and masks)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
    """Log-probability of each next token: ``[B, L, V], [B, L] -> [B, L-1]`` (fp32).

    Entry ``t`` is ``log p(tokens[t+1] | tokens[:t+1])``.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def next_token_loss(logits: jnp.ndarray, tokens: jnp.ndarray, loss_mask: jnp.ndarray, *,
                    normalise: str = "token", segment_ids: jnp.ndarray | None = None
                    ) -> tuple[jnp.ndarray, dict]:
    """Cross-entropy of the tokens where ``loss_mask`` is 1.

    ``loss_mask[b, t] = 1`` means token ``t`` is predicted from the tokens before it.
    ``normalise``: "token" averages over all trained tokens of the batch (long answers weigh
    more); "example" averages within each example first, then over the examples that have any
    trained token (every example weighs the same). In packed rows (``segment_ids`` ``[B, L]``,
    see medvl_jax.data.packing) an example is a segment, not a row.

    Returns ``(loss, {"nll_sum", "num_tokens", "accuracy"})``; accuracy is the fraction of
    trained tokens that are the argmax prediction.
    """
    mask = loss_mask[:, 1:].astype(jnp.float32)
    nll = -token_logprobs(logits, tokens) * mask
    n_tok = mask.sum()
    if normalise == "token":
        loss = nll.sum() / jnp.maximum(n_tok, 1.0)
    elif normalise == "example":
        if segment_ids is None:
            per_ex_tokens, per_ex_nll = mask.sum(axis=1), nll.sum(axis=1)
        else:  # One bucket per (row, segment); the predicted token's segment counts.
            b, l1 = mask.shape
            stride = l1 + 2  # Segment ids run from 0 (padding) to at most L = l1 + 1.
            ids = (jnp.arange(b)[:, None] * stride + segment_ids[:, 1:]).reshape(-1)
            n = b * stride
            per_ex_tokens = jax.ops.segment_sum(mask.reshape(-1), ids, n)
            per_ex_nll = jax.ops.segment_sum(nll.reshape(-1), ids, n)
        per_ex = per_ex_nll / jnp.maximum(per_ex_tokens, 1.0)
        has = (per_ex_tokens > 0).astype(jnp.float32)
        loss = (per_ex * has).sum() / jnp.maximum(has.sum(), 1.0)
    else:
        raise ValueError(f"normalise must be 'token' or 'example', got {normalise!r}")
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    acc = (correct * mask).sum() / jnp.maximum(n_tok, 1.0)
    return loss, {"nll_sum": nll.sum(), "num_tokens": n_tok, "token_accuracy": acc}
