"""Building blocks shared by the language decoders: RMSNorm, rotary embeddings, attention, MLP.

Every parameter carries logical axis names; the mesh rules (in ``medvl_jax.parallel``) map
them onto devices. Parameters are stored in ``param_dtype`` and cast to ``dtype`` for compute;
norms, softmax and rotary tables run in float32, as the reference implementations do.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.models.attention import attend

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Returns the activation function called ``name`` (silu, gelu_tanh, gelu, relu)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def param_with_axes(
    module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], dtype: Dtype,
    axes: tuple[str, ...],
) -> jnp.ndarray:
    """Declares a parameter whose axes carry the logical names ``axes``."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm. ``plus_one`` stores the scale as an offset from 1 (Gemma)."""

    eps: float = 1e-6
    plus_one: bool = False
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Normalises the last axis of ``x``."""
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = param_with_axes(self, "scale", init, (x.shape[-1],), self.param_dtype,
                                (self.axis_name,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        s = scale.astype(jnp.float32)
        y = y * (1.0 + s) if self.plus_one else y * s
        return y.astype(self.dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
    low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, original_max_len: int = 8192,
) -> jnp.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` of rotary embeddings, with optional scaling.

    ``scaling``: "none"; "linear" (frequencies divided by ``factor``); "llama3" (Llama 3.1's
    wavelength-dependent interpolation between scaled and unscaled frequencies).
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling == "none":
        return inv
    if scaling == "linear":
        return inv / factor
    if scaling == "llama3":
        low_wavelen = original_max_len / low_freq_factor
        high_wavelen = original_max_len / high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = ((original_max_len / wavelen - low_freq_factor)
                  / (high_freq_factor - low_freq_factor))
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope scaling {scaling!r}; expected none, linear or llama3")


def rope_tables(positions: jnp.ndarray, inv_freq: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Cos and sin tables ``[B, L, head_dim]`` (half-split layout) for integer ``positions``."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates ``x`` ``[B, L, H, D]`` by the tables ``[B, L, D]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Any = None, *, scale: float,
    softcap: float | None = None, impl: str = "xla",
) -> jnp.ndarray:
    """Grouped-query attention, the one call site of every tower.

    q ``[B,L,H,D]``, k/v ``[B,S,K,D]``; ``mask``: a :class:`~medvl_jax.models.masks.AttnMask`,
    a bool ``[B,L,S]`` array, or None (every query sees every key). ``impl`` is a config's
    ``attention_impl`` ("xla", "splash", "cudnn" or "auto"; see
    :mod:`medvl_jax.models.attention`). ``softcap``: ``cap * tanh(logits / cap)`` before the
    mask (Gemma 2).
    """
    return attend(q, k, v, mask, scale=scale, softcap=softcap, impl=impl)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` as used by Llama, Qwen2 and Gemma."""

    mlp_dim: int
    act: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Applies the MLP to ``x`` ``[B, L, E]``."""
        e = x.shape[-1]
        init = nn.initializers.lecun_normal()
        gate = param_with_axes(self, "gate", init, (e, self.mlp_dim), self.param_dtype,
                               ("embed", "mlp"))
        up = param_with_axes(self, "up", init, (e, self.mlp_dim), self.param_dtype,
                             ("embed", "mlp"))
        down = param_with_axes(self, "down", init, (self.mlp_dim, e), self.param_dtype,
                               ("mlp", "embed"))
        x = x.astype(self.dtype)
        h = activation(self.act)(x @ gate.astype(self.dtype)) * (x @ up.astype(self.dtype))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return h @ down.astype(self.dtype)
