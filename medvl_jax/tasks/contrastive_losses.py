"""Contrastive image–text losses: CLIP (InfoNCE), ConVIRT and SigLIP, plain and sharded.

Inputs are L2-normalised embeddings ``img [B, D]`` and ``txt [B, D]``; row ``i`` of each is a
positive pair, every other pairing is a negative. All losses are computed in float32.

Plain versions (one device, or any sharding left to XLA) build the ``[B, B]`` logits:

    clip_loss(img, txt, logit_scale)
    convirt_loss(img, txt, temperature, lam)
    siglip_loss(img, txt, logit_scale, logit_bias)

Sharded versions run *inside* a ``jax.shard_map`` whose batch is split over ``axis_name`` (one
mesh axis or a tuple, e.g. ``("data", "fsdp")``); each device holds its ``b = B / n`` rows and
the result is the global loss, the same on every device. Two implementations:

- ``impl="ring"``: text chunks travel around a ring of ``n`` devices (``ppermute``, ``n - 1``
  hops); a device only ever computes ``b x b`` logit blocks. SigLIP sums the sigmoid terms
  block by block; the softmax losses keep an online logsumexp per image row (local) and per
  text column (carried around the ring with its chunk). The backward pass is hand-written
  (``custom_vjp``): it recomputes the blocks while the text chunks make the same round again,
  their gradients travelling with them and arriving home after one last hop. Memory per
  device is O(b·b + b·D) in both passes: no array has a dimension of size ``B``.
- ``impl="all_gather"``: every device gathers all ``B`` text embeddings and computes its
  ``b x B`` logit rows (softmax column statistics are combined with ``pmax``/``psum``).
  Simpler, O(b·B + B·D) memory; kept for comparison.

``make_sharded_loss(kind, mesh)`` wraps either in a ``shard_map`` over global arrays.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

AxisName = str | tuple[str, ...]

KINDS = ("clip", "convirt", "siglip")
IMPLS = ("ring", "all_gather")


def _check_pair(img, txt, where: str) -> None:
    if img.ndim != 2 or txt.ndim != 2:
        raise ValueError(f"{where}: img and txt must be [B, D], got shapes {img.shape} and "
                         f"{txt.shape}")
    if img.shape != txt.shape:
        raise ValueError(f"{where}: img and txt shapes differ: {img.shape} vs {txt.shape} "
                         "(row i of each must be a positive pair)")


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


# ------------------------------------------------------------------------------------------
# Plain (single-device) losses.
# ------------------------------------------------------------------------------------------

def _softmax_loss(img, txt, multiplier, w_i2t, w_t2i):
    """w_i2t * mean_i CE(row i -> text i) + w_t2i * mean_j CE(column j -> image j)."""
    logits = multiplier * (img @ txt.T)
    pos = jnp.diagonal(logits)
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - pos)
    return w_i2t * i2t + w_t2i * t2i


def clip_loss(img: jnp.ndarray, txt: jnp.ndarray, logit_scale) -> jnp.ndarray:
    """Symmetric InfoNCE (CLIP): logits ``exp(logit_scale) * img @ txt.T``; the mean of the
    image->text and text->image cross-entropies, each averaged over the batch."""
    _check_pair(img, txt, "clip_loss")
    img, txt, logit_scale = _f32(img, txt, logit_scale)
    return _softmax_loss(img, txt, jnp.exp(logit_scale), 0.5, 0.5)


def convirt_loss(img: jnp.ndarray, txt: jnp.ndarray, temperature, lam) -> jnp.ndarray:
    """ConVIRT (Zhang et al. 2020): ``mean_i [lam * l(v->u)_i + (1 - lam) * l(u->v)_i]`` with
    ``l(v->u)_i = -log softmax_k(<v_i, u_k> / tau)_i`` (image->text) and ``l(u->v)`` the
    text->image counterpart; ``<.,.>`` is the cosine similarity of the normalised inputs."""
    _check_pair(img, txt, "convirt_loss")
    img, txt, temperature, lam = _f32(img, txt, temperature, lam)
    return _softmax_loss(img, txt, 1.0 / temperature, lam, 1.0 - lam)


def siglip_loss(img: jnp.ndarray, txt: jnp.ndarray, logit_scale, logit_bias) -> jnp.ndarray:
    """SigLIP (Zhai et al. 2023): ``-(1/B) sum_ij log sigmoid(z_ij (t <x_i, y_j> + b))`` with
    ``t = exp(logit_scale)``, ``b = logit_bias``, ``z = +1`` on the diagonal, ``-1`` elsewhere."""
    _check_pair(img, txt, "siglip_loss")
    img, txt, logit_scale, logit_bias = _f32(img, txt, logit_scale, logit_bias)
    logits = jnp.exp(logit_scale) * (img @ txt.T) + logit_bias
    z = 2.0 * jnp.eye(img.shape[0], dtype=jnp.float32) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / img.shape[0]


# ------------------------------------------------------------------------------------------
# Ring helpers (inside shard_map).
# ------------------------------------------------------------------------------------------

def _axes(axis_name: AxisName) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _axis_size(axis_name: AxisName) -> int:
    return math.prod(jax.lax.axis_size(a) for a in _axes(axis_name))


def _shift(tree, axis_name: AxisName, n: int):
    """Sends every array of ``tree`` from ring position i to position i + 1 (mod n)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, _axes(axis_name), perm), tree)


def _varying(x, axis_name: AxisName):
    """``x`` marked as varying over the batch axes (a no-op for axes it already varies over).

    Replicated scalars (scale, bias) enter the hand-written ring VJP as per-device values; the
    transpose of this cast sums their per-device gradients over the ring.
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # Where jax keeps the varying axes.
    have = manual.varying if manual is not None else getattr(aval, "vma", frozenset())
    missing = tuple(a for a in _axes(axis_name) if a not in have)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _lse_update(m, s, logits, axis):
    """Online logsumexp: folds ``logits`` (reduced over ``axis``) into running (max, sum)."""
    m_new = jnp.maximum(m, logits.max(axis=axis))
    expand = (lambda v: v[:, None]) if axis == 1 else (lambda v: v[None, :])
    s_new = s * jnp.exp(m - m_new) + jnp.exp(logits - expand(m_new)).sum(axis=axis)
    return m_new, s_new


# ------------------------------------------------------------------------------------------
# Ring SigLIP.
# ------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _siglip_ring(img, txt, t, bias, axis_name):
    return _siglip_ring_fwd(img, txt, t, bias, axis_name)[0]


def _siglip_ring_fwd(img, txt, t, bias, axis_name):
    n, b = _axis_size(axis_name), img.shape[0]
    z0 = 2.0 * jnp.eye(b, dtype=img.dtype) - 1.0
    total = jnp.sum(jax.nn.log_sigmoid(z0 * (t * (img @ txt.T) + bias)))

    def body(_, carry):
        chunk, acc = carry
        chunk = _shift(chunk, axis_name, n)
        return chunk, acc + jnp.sum(jax.nn.log_sigmoid(-(t * (img @ chunk.T) + bias)))

    _, total = jax.lax.fori_loop(1, n, body, (txt, total))
    loss = -jax.lax.psum(total, _axes(axis_name)) / (n * b)
    return loss, (img, txt, t, bias)


def _siglip_ring_bwd(axis_name, res, g):
    img, txt, t, bias = res
    n, b = _axis_size(axis_name), img.shape[0]
    c = g / (n * b)

    def block(chunk, z):
        sims = img @ chunk.T
        # d/dl [-log sigmoid(z l)] = -z sigmoid(-z l).
        grad_logits = -c * z * jax.nn.sigmoid(-z * (t * sims + bias))
        return (t * grad_logits @ chunk, t * grad_logits.T @ img,
                jnp.sum(grad_logits * sims), jnp.sum(grad_logits))

    d_img, d_txt, d_t, d_b = block(txt, 2.0 * jnp.eye(b, dtype=img.dtype) - 1.0)

    def body(_, carry):
        chunk, d_chunk, d_img, d_t, d_b = carry
        chunk, d_chunk = _shift((chunk, d_chunk), axis_name, n)
        gi, gc, gt, gb = block(chunk, -1.0)
        return chunk, d_chunk + gc, d_img + gi, d_t + gt, d_b + gb

    _, d_txt, d_img, d_t, d_b = jax.lax.fori_loop(1, n, body, (txt, d_txt, d_img, d_t, d_b))
    d_txt = _shift(d_txt, axis_name, n)  # After n - 1 hops, one more brings it home.
    return d_img, d_txt, d_t, d_b


_siglip_ring.defvjp(_siglip_ring_fwd, _siglip_ring_bwd)


# ------------------------------------------------------------------------------------------
# Ring softmax (CLIP / ConVIRT).
# ------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _softmax_ring(img, txt, mult, w_i2t, w_t2i, axis_name):
    return _softmax_ring_fwd(img, txt, mult, w_i2t, w_t2i, axis_name)[0]


def _softmax_ring_fwd(img, txt, mult, w_i2t, w_t2i, axis_name):
    n, b = _axis_size(axis_name), img.shape[0]
    logits = mult * (img @ txt.T)
    pos = jnp.diagonal(logits)  # Positives sit in the local (first) block only.
    row_m, col_m = logits.max(axis=1), logits.max(axis=0)
    row_s = jnp.exp(logits - row_m[:, None]).sum(axis=1)
    col_s = jnp.exp(logits - col_m[None, :]).sum(axis=0)

    def body(_, carry):
        chunk, col_m, col_s, row_m, row_s = carry
        # Column statistics travel with their text chunk.
        chunk, col_m, col_s = _shift((chunk, col_m, col_s), axis_name, n)
        logits = mult * (img @ chunk.T)
        row_m, row_s = _lse_update(row_m, row_s, logits, axis=1)
        col_m, col_s = _lse_update(col_m, col_s, logits, axis=0)
        return chunk, col_m, col_s, row_m, row_s

    _, col_m, col_s, row_m, row_s = jax.lax.fori_loop(
        1, n, body, (txt, col_m, col_s, row_m, row_s))
    col_m, col_s = _shift((col_m, col_s), axis_name, n)  # Home to the chunk's owner.
    row_lse, col_lse = row_m + jnp.log(row_s), col_m + jnp.log(col_s)
    i2t, t2i = jnp.sum(row_lse - pos), jnp.sum(col_lse - pos)  # Local sums.
    big_b = n * b
    loss = jax.lax.psum(w_i2t * i2t + w_t2i * t2i, _axes(axis_name)) / big_b
    return loss, (img, txt, mult, w_i2t, w_t2i, row_lse, col_lse, i2t / big_b, t2i / big_b)


def _softmax_ring_bwd(axis_name, res, g):
    img, txt, mult, w_i2t, w_t2i, row_lse, col_lse, i2t, t2i = res
    n, b = _axis_size(axis_name), img.shape[0]
    c_row, c_col = g * w_i2t / (n * b), g * w_t2i / (n * b)

    def block(chunk, chunk_lse):
        sims = img @ chunk.T
        logits = mult * sims
        grad_logits = (c_row * jnp.exp(logits - row_lse[:, None])
                       + c_col * jnp.exp(logits - chunk_lse[None, :]))
        return grad_logits, sims

    grad_logits, sims = block(txt, col_lse)
    grad_logits = grad_logits - (c_row + c_col) * jnp.eye(b, dtype=img.dtype)
    d_img = mult * grad_logits @ txt
    d_txt = mult * grad_logits.T @ img
    d_mult = jnp.sum(grad_logits * sims)

    def body(_, carry):
        chunk, chunk_lse, d_chunk, d_img, d_mult = carry
        chunk, chunk_lse, d_chunk = _shift((chunk, chunk_lse, d_chunk), axis_name, n)
        grad_logits, sims = block(chunk, chunk_lse)
        return (chunk, chunk_lse, d_chunk + mult * grad_logits.T @ img,
                d_img + mult * grad_logits @ chunk, d_mult + jnp.sum(grad_logits * sims))

    _, _, d_txt, d_img, d_mult = jax.lax.fori_loop(
        1, n, body, (txt, col_lse, d_txt, d_img, d_mult))
    d_txt = _shift(d_txt, axis_name, n)
    return d_img, d_txt, d_mult, g * i2t, g * t2i


_softmax_ring.defvjp(_softmax_ring_fwd, _softmax_ring_bwd)


# ------------------------------------------------------------------------------------------
# All-gather variants (plain autodiff).
# ------------------------------------------------------------------------------------------

def _gather_txt(txt, axis_name):
    txt_all = jax.lax.all_gather(txt, _axes(axis_name), axis=0, tiled=True)  # [B, D]
    offset = jax.lax.axis_index(_axes(axis_name)) * txt.shape[0]
    return txt_all, offset


def _siglip_gather(img, txt, t, bias, axis_name):
    n, b = _axis_size(axis_name), img.shape[0]
    txt_all, offset = _gather_txt(txt, axis_name)
    logits = t * (img @ txt_all.T) + bias  # [b, B]
    cols = jnp.arange(n * b)[None, :]
    z = jnp.where(cols == offset + jnp.arange(b)[:, None], 1.0, -1.0)
    return -jax.lax.psum(jnp.sum(jax.nn.log_sigmoid(z * logits)), _axes(axis_name)) / (n * b)


def _softmax_gather(img, txt, mult, w_i2t, w_t2i, axis_name):
    axes = _axes(axis_name)
    n, b = _axis_size(axis_name), img.shape[0]
    txt_all, offset = _gather_txt(txt, axis_name)
    logits = mult * (img @ txt_all.T)  # [b, B]
    pos = jnp.take_along_axis(logits, (offset + jnp.arange(b))[:, None], axis=1)[:, 0]
    i2t = jnp.sum(jax.nn.logsumexp(logits, axis=1) - pos)
    # Column logsumexp over all devices' rows: shared max (no gradient needed), summed exps.
    col_m = jax.lax.stop_gradient(jax.lax.pmax(jax.lax.stop_gradient(logits.max(axis=0)), axes))
    col_lse = col_m + jnp.log(jax.lax.psum(jnp.exp(logits - col_m[None, :]).sum(axis=0), axes))
    # Each device scores the columns of its own texts against its own positives.
    t2i = jnp.sum(jax.lax.dynamic_slice_in_dim(col_lse, offset, b) - pos)
    return jax.lax.psum(w_i2t * i2t + w_t2i * t2i, axes) / (n * b)


# ------------------------------------------------------------------------------------------
# Public sharded API.
# ------------------------------------------------------------------------------------------

def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def sharded_siglip_loss(img, txt, logit_scale, logit_bias, axis_name: AxisName, *,
                        impl: str = "ring") -> jnp.ndarray:
    """SigLIP loss of the global batch, called inside ``shard_map`` with the batch split over
    ``axis_name``; ``img``/``txt`` are this device's ``[b, D]`` rows, ``logit_scale`` and
    ``logit_bias`` replicated scalars. Returns the global loss (equal to ``siglip_loss`` on
    the gathered arrays) on every device. ``impl``: "ring" or "all_gather"."""
    _check_pair(img, txt, "sharded_siglip_loss")
    _check_impl(impl)
    img, txt, logit_scale, logit_bias = _f32(img, txt, logit_scale, logit_bias)
    t = jnp.exp(logit_scale)
    if impl == "all_gather":
        return _siglip_gather(img, txt, t, logit_bias, axis_name)
    return _siglip_ring(img, txt, _varying(t, axis_name), _varying(logit_bias, axis_name),
                        axis_name)


def _sharded_softmax(img, txt, mult, w_i2t, w_t2i, axis_name, impl):
    if impl == "all_gather":
        return _softmax_gather(img, txt, mult, w_i2t, w_t2i, axis_name)
    return _softmax_ring(img, txt, *(_varying(x, axis_name) for x in (mult, w_i2t, w_t2i)),
                         axis_name)


def sharded_clip_loss(img, txt, logit_scale, axis_name: AxisName, *,
                      impl: str = "ring") -> jnp.ndarray:
    """CLIP loss of the global batch inside ``shard_map`` (see ``sharded_siglip_loss``);
    equal to ``clip_loss`` on the gathered arrays."""
    _check_pair(img, txt, "sharded_clip_loss")
    _check_impl(impl)
    img, txt, logit_scale = _f32(img, txt, logit_scale)
    half = jnp.float32(0.5)
    return _sharded_softmax(img, txt, jnp.exp(logit_scale), half, half, axis_name, impl)


def sharded_convirt_loss(img, txt, temperature, lam, axis_name: AxisName, *,
                         impl: str = "ring") -> jnp.ndarray:
    """ConVIRT loss of the global batch inside ``shard_map`` (see ``sharded_siglip_loss``);
    equal to ``convirt_loss`` on the gathered arrays."""
    _check_pair(img, txt, "sharded_convirt_loss")
    _check_impl(impl)
    img, txt, temperature, lam = _f32(img, txt, temperature, lam)
    return _sharded_softmax(img, txt, 1.0 / temperature, lam, 1.0 - lam, axis_name, impl)


def make_sharded_loss(kind: str, mesh: Mesh, batch_axes: AxisName = ("data", "fsdp"), *,
                      impl: str = "ring") -> Callable:
    """A function ``loss(img, txt, scale, bias=None) -> scalar`` of global arrays that runs
    the sharded loss under ``shard_map`` on ``mesh`` (batch split over ``batch_axes``).

    ``kind``: "siglip" (scale = logit_scale, bias = logit_bias), "clip" (scale = logit_scale,
    bias unused) or "convirt" (scale = temperature, bias = lam). Differentiable in all
    arguments; jit it as usual. The global batch must divide by the batch axes' size.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check_impl(impl)
    axes = _axes(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch_axes {axes}: {unknown} not in mesh axes {mesh.axis_names}")
    n = math.prod(mesh.shape[a] for a in axes)

    def local(img, txt, scale, bias):
        if kind == "siglip":
            return sharded_siglip_loss(img, txt, scale, bias, axes, impl=impl)
        if kind == "clip":
            return sharded_clip_loss(img, txt, scale, axes, impl=impl)
        return sharded_convirt_loss(img, txt, scale, bias, axes, impl=impl)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                           out_specs=P())

    def loss(img, txt, scale, bias=None):
        _check_pair(img, txt, f"{kind} sharded loss")
        if img.shape[0] % n:
            raise ValueError(f"{kind} sharded loss: global batch {img.shape[0]} is not divisible "
                             f"by the {n} devices of batch axes {axes}")
        if bias is None:
            if kind == "convirt":
                raise ValueError("convirt sharded loss: pass lam as `bias`")
            bias = 0.0
        return mapped(img, txt, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))

    return loss
