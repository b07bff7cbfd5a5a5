"""One decoder-only language model covering Llama/Mistral, Qwen2/2.5, Gemma, Gemma 2 and Gemma 3.

The families differ only in switches of :class:`DecoderConfig`. Parameter layout (unscanned;
with ``scan_layers`` the per-layer trees are stacked under ``layers`` with a leading "layers"
axis)::

    embedder/embedding        [vocab, embed]
    layers_{i}/attn/q         [embed, heads, head_dim]      (+ q_bias [heads, head_dim])
    layers_{i}/attn/k, v      [embed, kv_heads, head_dim]   (+ k_bias, v_bias)
    layers_{i}/attn/o         [heads, head_dim, embed]
    layers_{i}/attn/q_norm, k_norm/scale   [head_dim]        (qk_norm)
    layers_{i}/mlp/gate, up   [embed, mlp];  mlp/down [mlp, embed]
    layers_{i}/pre_attn_norm, pre_mlp_norm (+ post_attn_norm, post_mlp_norm)/scale [embed]
    final_norm/scale          [embed]
    lm_head                   [embed, vocab]                (unless tie_embeddings)

KV cache: ``{"index": int32 [], "k": [layers, B, kv_heads, S, head_dim], "v": same}``. The
``L`` new tokens of a call are written at slots ``index .. index+L-1`` and ``index`` advances by
``L``. The caller's ``attn_mask`` is then ``[B, L, S]`` over cache slots; sliding windows are
counted in slots (``q_slot - k_slot < window``), which equals Hugging Face's convention.
The stacked cache travels through the layers (Python loop or ``nn.scan`` carry) and each layer
writes its slice with one ``dynamic_update_slice``, which XLA does in place: a decode step
reads each layer's keys/values once and never copies the whole cache. Heads sit before slots
so each (batch, head) block is contiguous and feeds the attention dots without transposes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.models import layers as L
from medvl_jax.models.attention import check_impl
from medvl_jax.models.masks import AttnMask, sliding_window_mask

Dtype = Any

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of :class:`Decoder`. Defaults describe a plain Llama-style model.

    ``layer_types``: per layer "global" or "local" (sliding window); ``None`` means every layer
    is local when ``sliding_window`` is set, global otherwise. Local layers use an unscaled
    rotary embedding with ``rope_local_theta`` when it is set (Gemma 3), else the global one.
    ``norm_plus_one``: RMSNorm scale stored as ``w`` and applied as ``1 + w`` (Gemma).
    ``sandwich_norms``: extra norms after attention and after the MLP (Gemma 2/3).
    ``query_pre_attn_scalar``: attention scale is its ``-1/2`` power (default ``head_dim``).
    ``remat_policy``: one of ``REMAT_POLICIES`` ("none" disables rematerialisation).
    ``attention_impl``: "auto", "xla", "splash" or "cudnn" (``medvl_jax.models.attention``);
    training and prefill use it, cached decode keeps its own XLA path.
    """

    vocab_size: int = 32000
    embed_dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    mlp_dim: int = 11008
    activation: str = "silu"
    norm_eps: float = 1e-6
    norm_plus_one: bool = False
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_local_theta: float | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    scale_embeddings: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    sandwich_norms: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "auto"
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_impl(self.attention_impl)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"num_layers={self.num_layers}")
            bad = set(self.layer_types) - {"local", "global"}
            if bad:
                raise ValueError(f"layer_types entries must be 'local' or 'global', got {bad}")
            if "local" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has local layers but sliding_window is None")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        L.activation(self.activation)

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it uses the sliding window."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "local" for t in self.layer_types)

    @property
    def attn_scale(self) -> float:
        """Scale applied to ``q . k``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype: Dtype | None = None) -> dict:
    """An empty KV cache of ``max_len`` slots (see the module docstring for its layout)."""
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    dtype = dtype or config.dtype
    return {"index": jnp.zeros((), jnp.int32), "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype)}


def cached_attention(q, k, v, mask, *, scale: float, softcap: float | None = None):
    """Grouped-query attention over cache slots. q ``[B,L,H,D]``; k/v ``[B,K,S,D]`` (cache
    layout); mask bool ``[B,L,S]``. Same math as ``layers.attention`` (float32 logits and
    softmax), with dots that read the cache in its own layout."""
    b, length, h, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, length, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, D]
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bkgld,bksd->bkgls", qg, k, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(scale, logits_dtype)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, None, None, :, :], logits.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bksd->bkgld", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, d)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, rotary embeddings and an optional cache."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_kv=None, index=None, layer=None):
        """x ``[B,L,E]``; cos/sin ``[B,L,D]``; mask: an :class:`AttnMask` over the ``L`` tokens
        (no cache, or a prefill into an empty one), else a bool ``[B,L,S]`` over cache slots.

        ``cache_kv``: None, or the stacked cache ``(k, v)`` (module docstring layout), into
        which this call writes layer ``layer`` at slot ``index``. Returns ``(out, new cache_kv)``.
        """
        c = self.config
        e, h, kh, d = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        pd, dt = c.param_dtype, c.dtype
        wq = L.param_with_axes(self, "q", init, (e, h, d), pd, ("embed", "heads", "head_dim"))
        wk = L.param_with_axes(self, "k", init, (e, kh, d), pd, ("embed", "kv_heads", "head_dim"))
        wv = L.param_with_axes(self, "v", init, (e, kh, d), pd, ("embed", "kv_heads", "head_dim"))
        wo = L.param_with_axes(self, "o", nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2),
                               (h, d, e), pd, ("heads", "head_dim", "embed"))
        x = x.astype(dt)
        q = jnp.einsum("ble,ehd->blhd", x, wq.astype(dt))
        k = jnp.einsum("ble,ehd->blhd", x, wk.astype(dt))
        v = jnp.einsum("ble,ehd->blhd", x, wv.astype(dt))
        if c.qkv_bias:
            def bias(name, n, axis):
                b = L.param_with_axes(self, name, nn.initializers.zeros, (n, d), pd,
                                      (axis, "head_dim"))
                return b.astype(dt)

            q = q + bias("q_bias", h, "heads")
            k = k + bias("k_bias", kh, "kv_heads")
            v = v + bias("v_bias", kh, "kv_heads")
        if c.qk_norm:
            norm = dict(eps=c.norm_eps, plus_one=c.norm_plus_one, axis_name="head_dim", dtype=dt,
                        param_dtype=pd)
            q = L.RMSNorm(name="q_norm", **norm)(q)
            k = L.RMSNorm(name="k_norm", **norm)(k)
        q = L.apply_rope(q, cos, sin)
        k = L.apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        new_kv = None
        if isinstance(mask, AttnMask):  # No cache, or a prefill: among the new tokens.
            out = L.attention(q, k, v, mask, scale=c.attn_scale, softcap=c.attn_logit_softcap,
                              impl=c.attention_impl)
        if cache_kv is not None:
            zero = jnp.zeros((), jnp.int32)
            start = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(index, jnp.int32),
                     zero)

            def write(full, new):  # [B, L, K, D] -> in place at [layer, :, :, index:index+L]
                new = new.astype(full.dtype).transpose(0, 2, 1, 3)[None]
                return jax.lax.dynamic_update_slice(full, new, start)

            new_kv = (write(cache_kv[0], k), write(cache_kv[1], v))
            ck, cv = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False).astype(dt)
                      for a in new_kv)
            if not isinstance(mask, AttnMask):
                out = cached_attention(q, ck, cv, mask, scale=c.attn_scale,
                                       softcap=c.attn_logit_softcap)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        b, length = out.shape[:2]
        # One [B*L, H*D] x [H*D, E] matmul: both operands are free reshapes (no weight copy).
        return (out.reshape(b, length, h * d) @ wo.astype(dt).reshape(h * d, e)), new_kv


class Block(nn.Module):
    """One decoder layer; fits ``nn.scan``: ``(carry, per_layer, shared) -> (carry, {})``.

    ``carry``: the residual stream ``x``, or with a cache ``(x, (k, v))`` where ``k``/``v`` are
    the whole stacked cache (updated in place at this layer's index).
    ``per_layer``: dict with "is_local" (bool scalar) and "layer" (int32 scalar index).
    ``shared``: dict with "cos"/"sin" and "cos_local"/"sin_local" tables, "mask" (an
    :class:`AttnMask`; with a cache, bool arrays "mask" and "mask_local") and, with a cache,
    "index". ``is_local``: the layer's kind when known statically (unscanned layers).
    """

    config: DecoderConfig
    is_local: bool | None = None

    @nn.compact
    def __call__(self, carry, per_layer, shared):
        """Runs the layer; returns the new carry (residual stream and cache) and ``{}``."""
        c = self.config
        x, cache_kv = carry if isinstance(carry, tuple) else (carry, None)
        is_local = per_layer["is_local"] if self.is_local is None else self.is_local
        cos = jnp.where(is_local, shared["cos_local"], shared["cos"])
        sin = jnp.where(is_local, shared["sin_local"], shared["sin"])
        if isinstance(shared["mask"], AttnMask):
            mask = shared["mask"].replace(local=is_local)
        else:
            mask = jnp.where(is_local, shared["mask_local"], shared["mask"])
        norm = dict(eps=c.norm_eps, plus_one=c.norm_plus_one, dtype=c.dtype,
                    param_dtype=c.param_dtype)
        h = L.RMSNorm(name="pre_attn_norm", **norm)(x)
        h, new_kv = Attention(c, name="attn")(h, cos, sin, mask, cache_kv, shared.get("index"),
                                              per_layer["layer"])
        if c.sandwich_norms:
            h = L.RMSNorm(name="post_attn_norm", **norm)(h)
        x = x + h
        h = L.RMSNorm(name="pre_mlp_norm", **norm)(x)
        h = L.GatedMLP(c.mlp_dim, c.activation, c.dtype, c.param_dtype, name="mlp")(h)
        if c.sandwich_norms:
            h = L.RMSNorm(name="post_mlp_norm", **norm)(h)
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        return (x if new_kv is None else (x, new_kv)), {}


class Decoder(nn.Module):
    """Decoder-only transformer LM; see the module docstring for layout and cache scheme."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embedding = L.param_with_axes(
            self, "embedding", nn.initializers.normal(1.0), (c.vocab_size, c.embed_dim),
            c.param_dtype, ("vocab", "embed"))
        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat_policy],
                             prevent_cse=not c.scan_layers)
        if c.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast), length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
        else:
            self.blocks = [block(c, c.local_layers[i], name=f"layers_{i}")
                           for i in range(c.num_layers)]
        self.final_norm = L.RMSNorm(eps=c.norm_eps, plus_one=c.norm_plus_one, dtype=c.dtype,
                                    param_dtype=c.param_dtype, name="final_norm")
        if not c.tie_embeddings:
            self.lm_head = L.param_with_axes(
                self, "lm_head", nn.initializers.lecun_normal(), (c.embed_dim, c.vocab_size),
                c.param_dtype, ("embed", "vocab"))

    def embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Token embeddings ``[B, L, E]``, scaled by ``sqrt(embed_dim)`` when configured."""
        c = self.config
        x = jnp.take(self.embedding, tokens, axis=0).astype(c.dtype)
        if c.scale_embeddings:
            x = x * jnp.asarray(c.embed_dim ** 0.5, c.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def __call__(self, tokens=None, *, embeddings=None, positions, attn_mask, cache=None,
                 decode=False, prefill=False):
        """Returns ``(logits [B, L, vocab] float32, aux)``.

        Args:
          tokens: int ``[B, L]``; or give ``embeddings`` ``[B, L, E]`` (already scaled).
          positions: int ``[B, L]`` rotary positions.
          attn_mask: bool ``[B, L, S]``, True = may attend; ``S = L`` without a cache, the cache
            length with one. Without a cache it may be an :class:`AttnMask`
            (``masks.attn_mask``), which fused attention kernels need: a bare array is known
            only densely and runs the xla path.
          cache: a cache from :func:`init_cache` (read and updated), or None.
          decode: asserts that a cache is given (the generation loop's step calls).
          prefill: the tokens fill an empty ``cache`` (index 0): attention runs among them
            through ``attention_impl`` as without a cache (``attn_mask`` over the ``L`` tokens,
            an ``AttnMask`` for fused kernels) and their keys/values are written to the cache.
        aux: ``{"hidden": final normed hidden states}`` plus ``"cache"`` when a cache is used.
        """
        c = self.config
        if (tokens is None) == (embeddings is None):
            raise ValueError("give exactly one of tokens and embeddings")
        if (decode or prefill) and cache is None:
            raise ValueError("decode=True and prefill=True need a cache")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(c.dtype)
        b, length = x.shape[:2]
        index = cache["index"] if cache is not None else 0

        inv = L.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, c.rope_factor,
                              c.rope_low_freq_factor, c.rope_high_freq_factor,
                              c.rope_original_max_len)
        cos, sin = L.rope_tables(positions, inv)
        if c.rope_local_theta is not None:
            cos_l, sin_l = L.rope_tables(positions, L.rope_inv_freq(c.head_dim, c.rope_local_theta))
        else:
            cos_l, sin_l = cos, sin
        shared = {"cos": cos, "sin": sin, "cos_local": cos_l, "sin_local": sin_l}
        carry = x
        if cache is None or prefill:
            mask = attn_mask
            if not isinstance(mask, AttnMask):
                mask = AttnMask.from_dense(mask)
            shared["mask"] = mask.replace(window=c.sliding_window)
            if cache is not None:
                shared["index"] = index
                carry = (x, (cache["k"], cache["v"]))
        else:
            mask = attn_mask.dense if isinstance(attn_mask, AttnMask) else attn_mask
            mask = mask.astype(bool)
            if c.sliding_window is not None:
                window = sliding_window_mask(length, mask.shape[-1], c.sliding_window, index)
                mask_local = mask & window[None]
            else:
                mask_local = mask
            shared.update(mask=mask, mask_local=mask_local, index=index)
            carry = (x, (cache["k"], cache["v"]))

        if c.scan_layers:
            per_layer = {"is_local": jnp.asarray(c.local_layers),
                         "layer": jnp.arange(c.num_layers, dtype=jnp.int32)}
            carry, _ = self.layers(carry, per_layer, shared)
        else:
            for i, blk in enumerate(self.blocks):
                per_layer = {"is_local": jnp.asarray(c.local_layers[i]), "layer": i}
                carry, _ = blk(carry, per_layer, shared)
        x, new_kv = carry if cache is not None else (carry, None)

        x = self.final_norm(x)
        head = self.embedding.T if c.tie_embeddings else self.lm_head
        logits = (x @ head.astype(c.dtype)).astype(jnp.float32)
        if c.final_logit_softcap is not None:
            logits = c.final_logit_softcap * jnp.tanh(logits / c.final_logit_softcap)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        aux = {"hidden": x}
        if cache is not None:
            aux["cache"] = {"index": index + length, "k": new_kv[0], "v": new_kv[1]}
        return logits, aux
