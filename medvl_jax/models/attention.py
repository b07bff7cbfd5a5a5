"""Attention kernels behind one entry point: XLA, Pallas splash attention (TPU), cuDNN (GPU).

:func:`attend` is what ``layers.attention`` runs for every tower; ``impl`` is the model
config's ``attention_impl``:

- ``"xla"``: plain XLA ops. Materialises ``[B, H, L, S]`` float32 logits; the reference.
- ``"splash"``: jax's Pallas TPU splash-attention kernel (flash-style, block-sparse). On other
  backends it runs in Pallas interpret mode (exact, slow: for tests).
- ``"cudnn"``: cuDNN flash attention via ``jax.nn.dot_product_attention(implementation=
  "cudnn")``.
- ``"auto"``: splash on TPU, cudnn on GPU, xla elsewhere.

Masks reach the kernels as structure (:class:`~medvl_jax.models.masks.AttnMask`): splash takes a
static mask (full, causal, sliding window, or "rows", below) plus per-example segment ids; a
per-example prefix (prefix-LM) or bidirectional image block becomes, per query, the last key it
may see, fed through the kernel's ``q_sequence`` into a mask computed inside the kernel ("rows":
every block is visited, none is skipped). cuDNN takes causal/no masks natively and any other
mask (a dense-only one included) as an additive bias. :func:`choose_impl` decides, from the backend, mask kind, dtype, head
dim and soft-cap, which implementation runs and why a request falls back to xla; each distinct
fallback is logged once.

Cached decode (``decoder.cached_attention``) does not come here: it keeps its own XLA path.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.models.masks import AttnMask

IMPLS = ("auto", "xla", "splash", "cudnn")

_log = logging.getLogger(__name__)
_LOGGED: set[str] = set()

# Kernel padding rows/columns: a segment id no real token has (they are >= 0, padding -1).
_KERNEL_PAD = -2
# "rows" masks on local layers pack (first, last) visible key into one int32 per query.
_ROWS_WINDOW_MAX_LEN = 1 << 15


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation, else a ValueError listing them."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl {impl!r} not in {IMPLS}")
    return impl


def set_tower_attention(config) -> None:
    """Gives ``config.vision`` and ``config.text`` the model-level ``attention_impl`` when it
    is set (a frozen dataclass with both towers: VLM or two-tower)."""
    if config.attention_impl is None:
        return
    impl = check_impl(config.attention_impl)
    for tower in ("vision", "text"):
        sub = getattr(config, tower)
        object.__setattr__(config, tower, dataclasses.replace(sub, attention_impl=impl))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_block(length: int) -> int:
    """Kernel block (a multiple of 128) for a sequence of ``length`` tokens."""
    n = _round_up(length, 128)
    return 128 if n <= 1024 else 256 if n <= 4096 else 512


def choose_impl(requested: str, *, platform: str, kind: str, dtype, head_dim: int,
                q_len: int, kv_len: int, softcap: float | None = None, windowed: bool = False,
                cudnn_max_head_dim: int = 256) -> tuple[str, str | None]:
    """``(implementation, reason)`` for one attention call; ``reason`` says why ``requested``
    fell back to xla (None when it did not).

    ``platform``: "tpu", "gpu" or "cpu"; ``kind``: ``AttnMask.kind`` ("full" without a mask);
    ``windowed``: the mask has a sliding window (local layers).
    """
    check_impl(requested)
    if requested == "auto":
        requested = {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")
    if requested == "xla":
        return "xla", None
    if requested == "splash":
        if kind == "dense":
            return "xla", ("the mask is only known as a dense array (build it with "
                           "masks.attn_mask / AttnMask to give its structure)")
        if kind in ("causal", "rows") and q_len != kv_len:
            return "xla", "a causal mask with different query and key lengths"
        if kind == "rows" and windowed and max(_round_up(q_len, splash_block(q_len)),
                                               _round_up(kv_len, splash_block(kv_len))
                                               ) > _ROWS_WINDOW_MAX_LEN:
            return "xla", (f"sliding windows over per-example blocks longer than "
                           f"{_ROWS_WINDOW_MAX_LEN} tokens")
        return "splash", None
    if platform != "gpu":
        return "xla", f"cuDNN attention needs a GPU (running on {platform})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "xla", f"cuDNN flash attention takes bfloat16/float16, not {jnp.dtype(dtype)}"
    if softcap is not None:
        return "xla", "cuDNN attention has no logit soft-capping"
    if head_dim > cudnn_max_head_dim or head_dim % 8:
        return "xla", (f"cuDNN attention needs a head dim <= {cudnn_max_head_dim} that is a "
                       f"multiple of 8 (got {head_dim})")
    return "cudnn", None


def target_platform() -> str:
    """Platform the traced program is for: the devices of the mesh set with ``jax.set_mesh``
    (TPU when compiling for a TPU topology on a CPU host), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        _log.warning(message)


# ------------------------------------------------------------------------------------ xla
def xla_attention(q, k, v, mask, *, scale: float, softcap: float | None = None):
    """q ``[B,L,H,D]``, k/v ``[B,S,K,D]``, mask bool ``[B, L or 1, S]`` or None.

    ``jax.nn.dot_product_attention`` (XLA ops; it never picks a fused kernel by itself). Soft-
    capping (``cap * tanh(logits / cap)`` before the mask, as Gemma 2 does) has no hook there,
    so that case is an explicit einsum with a float32 softmax.
    """
    if softcap is None:
        m = None if mask is None else mask[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale)
    b, l, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, l, kv, h // kv, d)
    logits = jnp.einsum("blkgd,bskd->bkgls", qg, k).astype(jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    return out.reshape(b, l, h, d)


# --------------------------------------------------------------------------------- splash
def _le(q_ids, k_ids):
    return k_ids <= q_ids


def _in_range(q_ids, k_ids):
    return (k_ids <= (q_ids & 0xFFFF)) & (k_ids >= (q_ids >> 16))


def encode_rows(last, window: int | None, xp=jnp):
    """Per-query kernel ``q_sequence`` of a "rows" mask: the last visible key, and with a
    window the first one too (``first << 16 | last``). ``xp``: jnp, or np for static masks."""
    last = last.astype(xp.int32)
    if window is None:
        return last
    first = xp.maximum(xp.arange(last.shape[-1], dtype=xp.int32) - (window - 1), 0)
    return (first << 16) | last


@functools.lru_cache(maxsize=None)
def _rows_mask_class():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    class RowsMask(sm._ComputableMask):  # pylint: disable=protected-access
        """Key ``j`` visible to query ``i`` when ``j <= last[i]`` (and ``j >= i - window + 1``),
        ``last`` coming per example through ``q_sequence``. Built with every query seeing up
        to the last key, so its block map covers any example's mask."""

        def __init__(self, shape: tuple[int, int], window: int | None):
            self.window = window
            super().__init__(shape, _le if window is None else _in_range)
            self.q_sequence = encode_rows(np.full(shape[0], shape[1] - 1), window, np)

        def __eq__(self, other):
            return (type(self) is type(other) and self.shape == other.shape
                    and self.window == other.window)

        def __hash__(self):
            return hash((type(self), self.shape, self.window))

    return RowsMask


def _splash_kernel(kind: str, q_len: int, kv_len: int, heads: int, window: int | None,
                   softcap: float | None, bq: int, bkv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (q_len, kv_len)
    if kind == "full":
        mask = sa.FullMask(shape)
    elif kind == "causal":
        mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    else:
        mask = _rows_mask_class()(shape, window)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                          block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                          block_kv_dq=bkv)
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                              interpret=interpret)


def _with_q_sequence(kernel, q_sequence):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    def put(info):
        return None if info is None else info._replace(q_sequence=q_sequence)

    return sk.SplashAttentionKernel(put(kernel.fwd_mask_info), put(kernel.dq_mask_info),
                                    put(kernel.dkv_mask_info), **kernel.kwargs)


def _pad_axis1(x, n: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def splash_attention(q, k, v, mask: AttnMask | None, *, scale: float,
                     softcap: float | None = None, local: bool = False,
                     block: int | None = None, interpret: bool | None = None):
    """Splash attention with ``mask``'s structure; ``local`` picks the sliding-window kernel.

    Lengths are padded to whole blocks (padding rows/keys get their own segment); q is scaled
    before the kernel (which does not scale); GQA maps query heads onto kv heads in the kernel.
    Runs per example (``vmap``), inside ``shard_map`` over the batch and heads when a mesh is
    set (:func:`_sharded`).
    """
    b, lq, h, _ = q.shape
    s = k.shape[1]
    kind = "full" if mask is None else mask.kind
    if interpret is None:
        interpret = target_platform() != "tpu"
    bq, bkv = block or splash_block(lq), block or splash_block(s)
    lp, sp = _round_up(lq, bq), _round_up(s, bkv)
    window = mask.window if mask is not None and local else None

    segs = None
    if mask is not None and mask.q_segments is not None:
        segs = (mask.q_segments, mask.kv_segments)
    elif kind == "full" and sp > s:
        segs = (jnp.zeros((b, lq), jnp.int32), jnp.zeros((b, s), jnp.int32))
    if segs is not None:
        segs = (_pad_axis1(segs[0].astype(jnp.int32), lp, _KERNEL_PAD),
                _pad_axis1(segs[1].astype(jnp.int32), sp, _KERNEL_PAD))
    rows = None
    if kind == "rows":
        idx = jnp.arange(lp, dtype=jnp.int32)[None]
        rows = jnp.where(idx < lq, _pad_axis1(mask.last_key.astype(jnp.int32), lp), idx)
        rows = encode_rows(rows, window)

    kernel = _splash_kernel(kind, lp, sp, h, window, softcap, bq, bkv, interpret)

    def one(qb, kb, vb, seg, row):  # One example: [L, H, D] -> kernel layout [H, L, D].
        kern = kernel if row is None else _with_q_sequence(kernel, row)
        ids = None
        if seg is not None:
            from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
            ids = SegmentIds(q=seg[0], kv=seg[1])
        out = kern(qb.transpose(1, 0, 2), kb.transpose(1, 0, 2), vb.transpose(1, 0, 2),
                   segment_ids=ids)
        return out.transpose(1, 0, 2)

    def run(qs, ks, vs, seg, row):
        return jax.vmap(one)(qs, ks, vs, seg, row)

    q = _pad_axis1(q * jnp.asarray(scale, q.dtype), lp)
    k, v = _pad_axis1(k, sp), _pad_axis1(v, sp)
    out = _sharded(run, q, k, v, segs, rows)
    return out[:, :lq]


def _axes_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def _sharded(fn: Callable, q, k, v, segs, rows):
    """``fn(q, k, v, segs, rows)`` inside ``shard_map`` over the mesh set with
    ``jax.set_mesh``: batch and heads split as the logical rules say (where they divide), the
    rest replicated. Without a mesh (or on one device) ``fn`` runs as is: a Pallas call is one
    opaque op that XLA's partitioner would otherwise gather onto every device."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(q, k, v, segs, rows)
    batch = nn.logical_to_mesh_axes(("batch",))[0]
    heads = nn.logical_to_mesh_axes(("heads",))[0]
    kv_heads = nn.logical_to_mesh_axes(("kv_heads",))[0]
    if q.shape[0] % _axes_size(mesh, batch):
        batch = None
    if (heads != kv_heads or q.shape[2] % _axes_size(mesh, heads)
            or k.shape[2] % _axes_size(mesh, heads)):
        heads = None
    qkv = P(batch, None, heads, None)
    tok = P(batch, None)
    specs = (qkv, qkv, qkv, None if segs is None else (tok, tok), None if rows is None else tok)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(
        q, k, v, segs, rows)


# ---------------------------------------------------------------------------------- cudnn
def cudnn_max_head_dim(platform: str) -> int:
    """Largest head dim cuDNN flash attention takes here: 256 from Hopper on, else 128."""
    if platform != "gpu":
        return 256
    try:
        cc = jax.devices("gpu")[0].compute_capability
        return 256 if float(cc) >= 9.0 else 128
    except (RuntimeError, AttributeError, ValueError):
        return 128


def cudnn_attention(q, k, v, mask: AttnMask | None, *, scale: float):
    """cuDNN flash attention: no mask and plain causal (with its window) natively; any other
    mask as an additive bias ``[B, 1, L or 1, S]`` (lengths padded to even, as cuDNN needs
    then)."""
    def call(**kw):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **kw)

    if mask is None or (mask.kind == "full" and mask.q_segments is None and mask.dense is None):
        return call()
    if mask.kind == "causal" and mask.q_segments is None and q.shape[1] == k.shape[1]:
        return per_local(mask, lambda local: call(
            is_causal=True, local_window_size=(mask.window - 1, 0) if local else None))
    lq, s = q.shape[1], k.shape[1]
    dense = mask.dense_mask()  # [B, L or 1, S]
    lp, sp = _round_up(lq, 2), _round_up(s, 2)
    qp, kp, vp = _pad_axis1(q, lp), _pad_axis1(k, sp), _pad_axis1(v, sp)
    rows = lp - lq if dense.shape[1] == lq else 0
    dense = jnp.pad(dense, ((0, 0), (0, rows), (0, sp - s)))
    out = jax.nn.dot_product_attention(qp, kp, vp, mask=dense[:, None], scale=scale,
                                       implementation="cudnn")
    return out[:, :lq]


# ------------------------------------------------------------------------------ dispatch
def per_local(mask: AttnMask | None, fn: Callable[[bool], jnp.ndarray]) -> jnp.ndarray:
    """``fn(local)`` with ``mask.local`` as a Python bool; a traced flag (scanned layers)
    becomes a ``lax.cond`` between the two."""
    if mask is None or mask.window is None:
        return fn(False)
    try:
        return fn(bool(mask.local))
    except jax.errors.ConcretizationTypeError:
        return jax.lax.cond(mask.local, lambda: fn(True), lambda: fn(False))


def attend(q, k, v, mask: AttnMask | jnp.ndarray | None = None, *, scale: float,
           softcap: float | None = None, impl: str = "xla"):
    """Grouped-query attention through the implementation ``impl`` asks for (module doc).

    q ``[B,L,H,D]``, k/v ``[B,S,K,D]``; ``mask``: an :class:`AttnMask`, a bool ``[B,L,S]``
    array (dense only: kernels fall back to xla) or None (every query sees every key).
    """
    if mask is not None and not isinstance(mask, AttnMask):
        mask = AttnMask.from_dense(mask)
    kind = "full" if mask is None else mask.kind
    platform = target_platform()
    chosen, reason = choose_impl(
        impl, platform=platform, kind=kind, dtype=q.dtype, head_dim=q.shape[-1],
        q_len=q.shape[1], kv_len=k.shape[1], softcap=softcap,
        windowed=mask is not None and mask.window is not None,
        cudnn_max_head_dim=cudnn_max_head_dim(platform))
    if reason is not None:
        _log_once(f"attention_impl={impl!r}: {reason}; those layers run the xla path")
    if chosen == "splash":
        return per_local(mask, lambda local: splash_attention(
            q, k, v, mask, scale=scale, softcap=softcap, local=local))
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, mask, scale=scale)
    return xla_attention(q, k, v, None if mask is None else mask.dense_mask(), scale=scale,
                         softcap=softcap)
