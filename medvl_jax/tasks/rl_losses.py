"""Pure losses of preference optimisation and RL with verifiable rewards.

Per-token inputs are ``[B, T]`` arrays over the completion positions, with ``mask[b, t] = 1``
on the completion tokens that count (padding and prompt positions 0). Log-probs are the
log-probabilities of the sampled tokens (see medvl_jax.tasks.losses.token_logprobs).

* :func:`group_advantages` — GRPO's group-relative advantages (Shao et al. 2024), or Dr.GRPO's
  mean-only version (Liu et al. 2025).
* :func:`grpo_loss` — the clipped surrogate with PPO/DAPO clip-higher bounds (Yu et al. 2025),
  a k3 KL penalty to a reference policy, and three ways to aggregate over tokens.
* :func:`dpo_loss` — DPO (Rafailov et al. 2023) with conservative label smoothing and optional
  per-pair weights (clinical-relevance weighting as in MMedPO).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo")


def group_advantages(rewards: jnp.ndarray, group_size: int, *, scale: str = "std",
                     ddof: int = 0, eps: float = 1e-6) -> jnp.ndarray:
    """Advantages ``[B]`` of rewards ``[B]`` normalised within groups of ``group_size``.

    The G completions of one prompt are consecutive (rows ``g*G .. g*G+G-1``).
    ``scale="std"``: ``(r - mean_group) / (std_group + eps)`` (GRPO; ``ddof`` 0 = population
    std, 1 = sample std); ``scale="none"``: ``r - mean_group`` (Dr.GRPO).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {rewards.shape}")
    b = rewards.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"{b} rewards are not whole groups of group_size={group_size}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if ddof not in (0, 1) or (ddof == 1 and scale == "std" and group_size < 2):
        raise ValueError(f"ddof must be 0 or 1 (1 needs group_size >= 2), got ddof={ddof} "
                         f"with group_size={group_size}")
    r = rewards.reshape(b // group_size, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "std":
        centred = centred / (jnp.std(r, axis=1, ddof=ddof, keepdims=True) + eps)
    return centred.reshape(b)


def _check_per_token(name: str, x, shape) -> jnp.ndarray:
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} has shape {x.shape}, expected {shape} (per token, like logp)")
    return x


def aggregate(per_token: jnp.ndarray, mask: jnp.ndarray, aggregation: str,
              max_len: int | None = None, token_norm=None) -> jnp.ndarray:
    """A scalar from per-token values ``[B, T]`` over ``mask``.

    ``token_mean``: sum over all masked tokens of the batch / their number (DAPO); with
    ``token_norm`` given, / ``token_norm`` instead: under gradient accumulation, the token
    count of the whole batch over the number of microbatches, so that the mean of the
    microbatches' losses is the token mean of the whole batch.
    ``sequence_mean``: mean over sequences of each sequence's token mean (GRPO paper;
    sequences without tokens count as 0).
    ``dr_grpo``: sum over masked tokens / (B * max_len), ``max_len`` a constant (default T).
    """
    mask = mask.astype(jnp.float32)
    total = (per_token * mask).sum()
    if aggregation == "token_mean":
        norm = mask.sum() if token_norm is None else jnp.asarray(token_norm, jnp.float32)
        return total / jnp.maximum(norm, 1e-9 if token_norm is not None else 1.0)
    if aggregation == "sequence_mean":
        per_seq = (per_token * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
        return per_seq.mean()
    if aggregation == "dr_grpo":
        length = per_token.shape[1] if max_len is None else int(max_len)
        if length <= 0:
            raise ValueError(f"max_len must be positive, got {max_len}")
        return total / (per_token.shape[0] * length)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def k3_kl(logp: jnp.ndarray, ref_logp: jnp.ndarray) -> jnp.ndarray:
    """Per-token k3 estimate of KL(policy || reference): ``exp(d) - d - 1``, ``d = ref - logp``
    (non-negative, unbiased for tokens sampled from the policy)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_loss(logp: jnp.ndarray, old_logp: jnp.ndarray, ref_logp: jnp.ndarray | None,
              advantages: jnp.ndarray, mask: jnp.ndarray, *, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, aggregation: str = "token_mean",
              max_len: int | None = None, token_norm=None) -> tuple[jnp.ndarray, dict]:
    """Clipped policy-gradient loss of GRPO / DAPO / Dr.GRPO.

    Args:
      logp: ``[B, T]`` log-probs of the completion tokens under the policy being trained.
      old_logp: ``[B, T]`` the same under the policy that sampled them (no gradient).
      ref_logp: ``[B, T]`` the same under the frozen reference policy, or None when beta = 0.
      advantages: ``[B]`` (one per completion) or ``[B, T]``.
      mask: ``[B, T]`` 1 on completion tokens.
      eps_low, eps_high: the ratio is clipped to ``[1 - eps_low, 1 + eps_high]``.
      beta: weight of the k3 KL to the reference (0: skipped).
      aggregation: ``token_mean`` | ``sequence_mean`` | ``dr_grpo`` (see :func:`aggregate`).
      max_len: Dr.GRPO's constant length (default T).
      token_norm: ``token_mean``'s denominator when not this batch's token count (see
        :func:`aggregate`).

    Per token: ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A) + beta * k3``, ``r = exp(logp -
    old_logp)``. Returns ``(loss, metrics)``; metrics: ``clip_fraction`` (tokens where the
    clipped term is the one taken) and its ``clip_low_fraction`` / ``clip_high_fraction``
    parts, ``kl`` (token mean of k3; 0 when beta = 0 and no ref_logp), ``ratio_mean`` /
    ``ratio_min`` / ``ratio_max`` over masked tokens, ``pg_loss`` (the loss without the KL).
    """
    logp = jnp.asarray(logp)
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
    shape = logp.shape
    old_logp = jax.lax.stop_gradient(_check_per_token("old_logp", old_logp, shape))
    mask = _check_per_token("mask", mask, shape).astype(jnp.float32)
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    if advantages.shape == shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != shape:
        raise ValueError(f"advantages has shape {advantages.shape}, expected {shape[:1]} or "
                         f"{shape}")
    if eps_low < 0 or eps_high < 0 or eps_low >= 1:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, "
                         f"eps_high={eps_high}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    logp = logp.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp.astype(jnp.float32))
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = -jnp.minimum(ratio * advantages, clipped * advantages)
    per_token = pg
    kl = None
    if ref_logp is not None:
        ref_logp = jax.lax.stop_gradient(_check_per_token("ref_logp", ref_logp, shape))
        kl = k3_kl(logp, ref_logp.astype(jnp.float32))
    if beta > 0:
        if kl is None:
            raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference log-probs)")
        per_token = pg + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_len, token_norm)

    n = jnp.maximum(mask.sum(), 1.0)
    low = ((ratio < 1.0 - eps_low) & (advantages < 0)).astype(jnp.float32) * mask
    high = ((ratio > 1.0 + eps_high) & (advantages > 0)).astype(jnp.float32) * mask
    big = jnp.finfo(jnp.float32).max
    metrics = {
        "pg_loss": aggregate(pg, mask, aggregation, max_len, token_norm),
        "clip_fraction": (low + high).sum() / n,
        "clip_low_fraction": low.sum() / n,
        "clip_high_fraction": high.sum() / n,
        "kl": (kl * mask).sum() / n if kl is not None else jnp.zeros((), jnp.float32),
        "ratio_mean": (ratio * mask).sum() / n,
        "ratio_min": jnp.where(mask > 0, ratio, big).min(),
        "ratio_max": jnp.where(mask > 0, ratio, -big).max(),
    }
    return loss, metrics


def dpo_loss(policy_chosen_logp: jnp.ndarray, policy_rejected_logp: jnp.ndarray,
             ref_chosen_logp: jnp.ndarray, ref_rejected_logp: jnp.ndarray, *, beta: float = 0.1,
             label_smoothing: float = 0.0, weights: jnp.ndarray | None = None,
             nll_weight: float = 0.0,
             chosen_lengths: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
    """DPO loss of ``B`` preference pairs from sequence log-probs ``[B]`` (sums over the
    completion tokens).

    ``z = beta * ((pi_c - ref_c) - (pi_r - ref_r))``; per pair
    ``-(1 - ls) log sigmoid(z) - ls log sigmoid(-z)`` (conservative DPO: ``ls`` is the assumed
    probability that the preference label is flipped; ``ls = 0`` is plain DPO), plus, with
    ``nll_weight`` ``a > 0``, ``-a * pi_c / chosen_lengths`` (the chosen completion's mean
    token NLL: RPO, Pang et al. 2024; ``chosen_lengths`` ``[B]`` are its token counts).
    ``weights`` ``[B]`` (>= 0): the loss is ``sum(w * l) / sum(w)`` (a weighted mean; with
    gradient accumulation give weights of mean 1 per microbatch to keep microbatches equal);
    None: the plain mean.

    Returns ``(loss, metrics)``: ``chosen_reward`` / ``rejected_reward`` (means of the implicit
    rewards ``beta * (pi - ref)``), ``reward_margin`` (mean of their difference) and
    ``reward_accuracy`` (fraction of pairs whose chosen reward is higher).
    """
    shapes = {n: jnp.shape(x) for n, x in (("policy_chosen_logp", policy_chosen_logp),
                                            ("policy_rejected_logp", policy_rejected_logp),
                                            ("ref_chosen_logp", ref_chosen_logp),
                                            ("ref_rejected_logp", ref_rejected_logp))}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"DPO log-probs must all be [B] (one per sequence), got {shapes}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if nll_weight < 0 or (nll_weight > 0 and chosen_lengths is None):
        raise ValueError(f"nll_weight must be >= 0 and, when > 0, needs chosen_lengths; got "
                         f"nll_weight={nll_weight}, chosen_lengths={chosen_lengths}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    chosen = beta * (f32(policy_chosen_logp) - jax.lax.stop_gradient(f32(ref_chosen_logp)))
    rejected = beta * (f32(policy_rejected_logp)
                       - jax.lax.stop_gradient(f32(ref_rejected_logp)))
    z = chosen - rejected
    per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z)
                - label_smoothing * jax.nn.log_sigmoid(-z))
    metrics = {}
    if nll_weight > 0:
        nll = -f32(policy_chosen_logp) / jnp.maximum(f32(chosen_lengths), 1.0)
        per_pair = per_pair + nll_weight * nll
        metrics["chosen_nll"] = nll.mean()
    if weights is None:
        loss = per_pair.mean()
    else:
        w = jax.lax.stop_gradient(f32(weights))
        if w.shape != per_pair.shape:
            raise ValueError(f"weights has shape {w.shape}, expected {per_pair.shape}")
        loss = (w * per_pair).sum() / jnp.maximum(w.sum(), 1e-12)
    metrics.update(chosen_reward=chosen.mean(), rejected_reward=rejected.mean(),
                   reward_margin=z.mean(),
                   reward_accuracy=(chosen > rejected).astype(jnp.float32).mean())
    return loss, metrics
