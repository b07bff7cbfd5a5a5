"""KV-cache generation for the decoder and the VLM: one jitted prefill + ``lax.while_loop`` decode.

Layout. Prompts are **left-padded** to a common length ``P`` (``input_mask`` False on the
padding), so every row's last prompt token sits in slot ``P - 1`` and the first new token of
every row goes to slot ``P``. The cache has ``P + max_new_tokens`` slots; new token ``t`` of a
row is written to slot ``P + t``. Rotary positions ignore padding: a prompt token's position is
the number of real tokens before it (plus the VLM's ``position_offset``), and new token ``t``
of a row with ``n`` real prompt tokens gets position ``n + t`` (+ offset). Padding slots are
never attended to. This is what Hugging Face computes for left-padded batches, so a batch
gives the same tokens as generating each example alone.

Prompt attention: causal by default; ``mask_ar`` (big_vision convention, see
``models.masks``) can make a prefix bidirectional (PaliGemma: all zeros); with a Gemma 3-style
VLM (``image_bidirectional``) the tokens of one image also see each other both ways. Generated
tokens are causal and see every real prompt token.

Log-probabilities. ``logprobs[b, t]`` is ``log_softmax(logits)[token]`` of the sampled token,
where ``logits`` are exactly what the model returns for that step (float32, after the final
logit soft-cap when the family has one) — **temperature 1, no top-k/top-p filtering**. This is
the policy log-likelihood that RL objectives (GRPO, PPO ratios, KL to a reference) need, and it
equals a full non-cached forward pass over prompt + completion at those positions.

Stopping. A row is done after it emits one of ``stop_tokens`` (the stop token is included in
its output and its length) or after ``max_new_tokens``. Slots after a row's end hold
``pad_id`` with log-probability 0. The loop exits early when every row is done.

Determinism: token ``t`` is drawn with ``jax.random.fold_in(rng, t)``; the same key, inputs
and knobs give the same output. Temperature, top-k, top-p and stop tokens are traced values,
so the jitted function compiles once per (batch, prompt length, max_new_tokens, image shape)
and model config (stop-token lists are padded to a multiple of 8).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.models.decoder import Decoder, DecoderConfig, init_cache
from medvl_jax.models.masks import make_attn_mask
from medvl_jax.models.vlm import VLM, VLMConfig, image_groups
from medvl_jax.sampling.filters import choose_tokens

ModelConfig = DecoderConfig | VLMConfig


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """Result of :func:`generate`.

    tokens: int32 ``[B, max_new_tokens]`` generated ids, ``pad_id`` after a row's end.
    logprobs: float32 ``[B, max_new_tokens]`` log-probability of each sampled token under the
        model's unmodified softmax at temperature 1 (0 after a row's end).
    lengths: int32 ``[B]`` number of generated tokens (stop token included).
    done: bool ``[B]`` True for rows that emitted a stop token.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    done: np.ndarray


def _text_config(config: ModelConfig) -> DecoderConfig:
    return config.text if isinstance(config, VLMConfig) else config


def _forward(config: ModelConfig, params: Any, tokens, images, positions, attn_mask, cache):
    """One cached model call: ``(logits [B, L, V], new cache)``."""
    if isinstance(config, VLMConfig):
        ones = jnp.ones(tokens.shape, bool)
        logits, aux = VLM(config).apply({"params": params}, tokens, images, input_mask=ones,
                                        mask_ar=ones, positions=positions, attn_mask=attn_mask,
                                        cache=cache, decode=True)
    else:
        logits, aux = Decoder(config).apply({"params": params}, tokens, positions=positions,
                                            attn_mask=attn_mask, cache=cache, decode=True)
    return logits, aux["cache"]


def prompt_attn_mask(config: ModelConfig, tokens: jnp.ndarray, input_mask: jnp.ndarray,
                     mask_ar: jnp.ndarray | None) -> jnp.ndarray:
    """Bool ``[B, P, P]`` attention mask of the prompt (see the module docstring)."""
    if mask_ar is None:
        mask_ar = jnp.ones(tokens.shape, jnp.int32)
    groups = None
    if isinstance(config, VLMConfig) and config.image_bidirectional:
        groups = image_groups(tokens == config.image_token_id)
    return make_attn_mask(input_mask, mask_ar, image_groups=groups)


def _position_offset(config: ModelConfig) -> int:
    return config.position_offset if isinstance(config, VLMConfig) else 0


def suppress_image_token(logits: jnp.ndarray, image_token_id: int) -> jnp.ndarray:
    """``logits [..., V]`` with the image placeholder's set to -inf. A sampled placeholder would
    be read back as an image slot by the next full forward pass (the trainer's log-probs of a
    sampled completion), so a VLM's sampler and trainer both leave it out of the distribution."""
    return logits.at[..., image_token_id].set(-jnp.inf)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _generate(params, tokens, input_mask, mask_ar, images, rng, temperature, top_k, top_p,
              stop_tokens, pad_id, *, config: ModelConfig, max_new_tokens: int):
    b, p = tokens.shape
    n = max_new_tokens
    s = p + n
    offset = _position_offset(config)
    input_mask = input_mask.astype(bool)
    n_prompt = input_mask.sum(axis=1).astype(jnp.int32)

    # ---- prefill: the whole prompt (and images) in one call
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0) + offset
    mask = prompt_attn_mask(config, tokens, input_mask, mask_ar)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, n)))
    cache = init_cache(_text_config(config), b, s)
    if isinstance(config, VLMConfig):
        logits, cache = _forward(config, params, tokens, images, positions, mask, cache)
    else:
        logits, cache = _forward(config, params, tokens, None, positions, mask, cache)
    slot_valid = jnp.pad(input_mask, ((0, 0), (0, n)))

    # ---- decode loop: sample from the current logits, then feed the sampled token
    def cond(state):
        return (state["t"] < n) & ~jnp.all(state["done"])

    def body(state):
        t = state["t"]
        last = state["logits"]
        if isinstance(config, VLMConfig):  # The image placeholder is input only, never output.
            last = suppress_image_token(last, config.image_token_id)
        tok = choose_tokens(jax.random.fold_in(rng, t), last, temperature, top_k, top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(last, axis=-1), tok[:, None], axis=-1)[:, 0]
        alive = ~state["done"]
        tok = jnp.where(alive, tok, pad_id)
        logp = jnp.where(alive, logp, 0.0)
        hit = alive & jnp.any(tok[:, None] == stop_tokens[None, :], axis=-1)
        out_tokens = jax.lax.dynamic_update_slice_in_dim(state["tokens"], tok[:, None], t, 1)
        out_logp = jax.lax.dynamic_update_slice_in_dim(state["logprobs"], logp[:, None], t, 1)
        lengths = state["lengths"] + alive.astype(jnp.int32)
        slot = p + t
        valid = state["slot_valid"].at[:, slot].set(True)
        pos = (n_prompt + t + offset)[:, None]
        step_logits, cache = _forward(config, params, tok[:, None], None, pos,
                                      valid[:, None, :], state["cache"])
        return dict(t=t + 1, logits=step_logits[:, -1], cache=cache, slot_valid=valid,
                    tokens=out_tokens, logprobs=out_logp, lengths=lengths,
                    done=state["done"] | hit)

    state = dict(t=jnp.zeros((), jnp.int32), logits=logits[:, -1], cache=cache,
                 slot_valid=slot_valid, tokens=jnp.full((b, n), 1, jnp.int32) * pad_id,
                 logprobs=jnp.zeros((b, n), jnp.float32), lengths=jnp.zeros((b,), jnp.int32),
                 done=jnp.zeros((b,), bool))
    state = jax.lax.while_loop(cond, body, state)
    return state["tokens"], state["logprobs"], state["lengths"], state["done"]


def sampling_program(config: ModelConfig, max_new_tokens: int):
    """``(fn, extra)``: the jitted sampling program as ``fn(params, tokens, input_mask, mask_ar,
    images, *extra)``, and ``extra`` (rng, temperature 1, no top-k/top-p, eight stop-token
    slots, pad id) as values. What :func:`generate` runs; planners lower it for other
    devices and count its FLOPs."""
    fn = functools.partial(_generate, config=config, max_new_tokens=int(max_new_tokens))
    extra = (jax.random.key(0), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0),
             jnp.full((8,), -1, jnp.int32), jnp.int32(0))
    return fn, extra


def generate(config: ModelConfig, params: Any, tokens: Any, input_mask: Any | None = None, *,
             images: Any | None = None, mask_ar: Any | None = None, max_new_tokens: int = 32,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), pad_id: int = 0
             ) -> GenerationOutput:
    """Generates up to ``max_new_tokens`` tokens per row with a KV cache.

    Args:
      config: a :class:`DecoderConfig` (text model) or :class:`VLMConfig`.
      params: the model's params (``{"params": ...}`` contents).
      tokens: int ``[B, P]`` **left-padded** prompts (VLM: with image tokens in place).
      input_mask: ``[B, P]`` True for real prompt tokens (default: all real).
      images: VLM only, ``[B, N, H, W, C]`` (or volumes) for the image tokens of the prompts.
      mask_ar: optional ``[B, P]`` prompt ``mask_ar`` (0 = bidirectional prefix); default causal.
      max_new_tokens: number of decode steps (static: part of the compiled shape).
      rng: PRNG key (needed unless greedy).
      temperature: 0 for greedy; otherwise logits are divided by it before sampling.
      top_k: keep the ``k`` most likely tokens (0 = off). top_p: nucleus mass (1 = off).
      stop_tokens: ids that end a row (included in its output).
      pad_id: id written after a row's end.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, prompt_len], got shape {tokens.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_mask is None:
        input_mask = jnp.ones(tokens.shape, bool)
    input_mask = jnp.asarray(input_mask, bool)
    if input_mask.shape != tokens.shape:
        raise ValueError(f"input_mask shape {input_mask.shape} != tokens shape {tokens.shape}")
    if bool(jnp.any(input_mask[:, :-1] & ~input_mask[:, 1:])):
        raise ValueError("prompts must be left-padded: input_mask has a real token after padding")
    if isinstance(config, VLMConfig):
        if images is not None:
            images = jnp.asarray(images, jnp.float32)
    elif images is not None:
        raise ValueError("images given for a text-only decoder config")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    rng = jax.random.key(0) if rng is None else rng
    stops = list(stop_tokens)
    stops += [-1] * (-len(stops) % 8 or (8 if not stops else 0))  # fixed size: no recompiles
    stops = jnp.asarray(stops, jnp.int32)
    if mask_ar is not None:
        mask_ar = jnp.asarray(mask_ar, jnp.int32)
    out = _generate(params, tokens, input_mask, mask_ar, images, rng,
                    jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), stops,
                    jnp.int32(pad_id), config=config, max_new_tokens=int(max_new_tokens))
    toks, logp, lengths, done = jax.device_get(out)
    return GenerationOutput(tokens=np.asarray(toks), logprobs=np.asarray(logp),
                            lengths=np.asarray(lengths), done=np.asarray(done))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to ``[B, P]``: returns ``(tokens int32, input_mask bool)``."""
    p = max(len(x) for x in prompts) if length is None else length
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    mask = np.zeros((len(prompts), p), bool)
    for i, x in enumerate(prompts):
        if len(x) > p:
            raise ValueError(f"prompt {i} has {len(x)} tokens, more than length={p}")
        if len(x):
            tokens[i, p - len(x):] = x
            mask[i, p - len(x):] = True
    return tokens, mask
