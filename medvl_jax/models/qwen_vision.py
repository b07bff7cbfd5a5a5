"""The Qwen2-VL / Qwen2.5-VL vision tower, on static shapes.

Input is a fixed budget of ``N`` patches per example (see ``medvl_jax.data.qwen_processor``):
the patches of every image/video of the example, one after another in the processor's
merge-aware order, then padding. Each patch carries its ``(t, h, w)`` coordinate in its own
grid and a segment id (1, 2, ... per image or video, 0 for padding). A patch attends only to
patches of the same segment and the same temporal slice (as in transformers, the frames of a
video meet only in the language model); Qwen2.5-VL layers outside ``fullatt_block_indexes``
further restrict attention to square windows of ``window_size`` pixels. Padding never reaches
a real patch and comes out as zero tokens.

Parameter layout (unscanned; ``scan_layers`` stacks ``layers_{i}`` into ``layers``)::

    patch                   [tp, p, p, C, W]     (Conv3D kernel without bias)
    layers_{i}/norm1, norm2 /scale (+ /bias for Qwen2-VL's LayerNorm)   [W]
    layers_{i}/attn/qkv     [W, 3, H, D];  attn/qkv_bias [3, H, D]
    layers_{i}/attn/o       [H, D, W];     attn/o_bias [W]
    layers_{i}/mlp/fc1 [W, M], fc2 [M, W] (+ biases)                   Qwen2-VL (QuickGELU)
    layers_{i}/mlp/gate, up [W, M], down [M, W] (+ biases)             Qwen2.5-VL (SwiGLU)
    merger/norm/scale (+ bias)  [W]
    merger/fc1 [m*m*W, m*m*W], merger/fc2 [m*m*W, out] (+ biases)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvl_jax.models import layers as L
from medvl_jax.models.decoder import REMAT_POLICIES
from medvl_jax.models.vision import LayerNorm

Dtype = Any

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
VARIANTS = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """Hyper-parameters of :class:`QwenVisionEncoder`; defaults are Qwen2.5-VL-7B's tower.

    Field <- transformers' ``Qwen2VLVisionConfig`` / ``Qwen2_5_VLVisionConfig``:
    ``width`` <- ``embed_dim`` / ``hidden_size``; ``mlp_dim`` <- ``embed_dim * mlp_ratio`` /
    ``intermediate_size``; ``out_dim`` (the decoder's width) <- ``hidden_size`` /
    ``out_hidden_size``; ``activation`` <- ``hidden_act``; ``in_channels``, ``patch_size``,
    ``temporal_patch_size``, ``spatial_merge_size``, ``window_size`` (pixels; 0 = none, as in
    Qwen2-VL), ``fullatt_block_indexes``, ``tokens_per_second`` (used by the decoder's video
    positions, not here) and ``rope_theta`` keep their names.
    ``variant``: "qwen2_vl" (LayerNorm, fc1/act/fc2 MLP, merger LayerNorm) or "qwen2_5_vl"
    (RMSNorm, gated MLP, merger RMSNorm).
    """

    variant: str = "qwen2_5_vl"
    depth: int = 32
    width: int = 1280
    num_heads: int = 16
    mlp_dim: int = 3420
    out_dim: int = 3584
    activation: str = "silu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    scan_layers: bool = False
    remat_policy: str = "none"
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.activation not in _ACTS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(_ACTS)}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"the 2D rotary embedding needs head_dim % 4 == 0, got "
                             f"{self.head_dim}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        if self.window_size < 0 or (self.window_size and not self.window_patches):
            raise ValueError(f"window_size={self.window_size} px is smaller than one merged token "
                             f"({self.patch_size * self.spatial_merge_size} px)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} out of range for depth={self.depth}")

    @classmethod
    def qwen2_vl(cls, **overrides: Any) -> "QwenVisionConfig":
        """Qwen2-VL-7B's tower (the 2B differs only in ``out_dim=1536``)."""
        kw = dict(variant="qwen2_vl", width=1280, mlp_dim=5120, out_dim=3584,
                  activation="quick_gelu", window_size=0, fullatt_block_indexes=())
        return cls(**{**kw, **overrides})

    @classmethod
    def qwen2_5_vl(cls, **overrides: Any) -> "QwenVisionConfig":
        """Qwen2.5-VL-7B's tower (3B: ``out_dim=2048``; 32B/72B: 5120/8192)."""
        return cls(**overrides)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one output token."""
        return self.spatial_merge_size ** 2

    @property
    def window_patches(self) -> int:
        """Side of an attention window in patches (a whole number of merged tokens); 0 = none."""
        m = self.spatial_merge_size
        return (self.window_size // m // self.patch_size) * m

    @property
    def full_layers(self) -> tuple[bool, ...]:
        """Per layer, whether it attends over whole images (every layer without windows)."""
        if not self.window_size:
            return (True,) * self.depth
        return tuple(i in self.fullatt_block_indexes for i in range(self.depth))


def rope_tables(positions: jnp.ndarray, head_dim: int, theta: float):
    """Cos/sin ``[B, N, head_dim]`` of the 2D rotary embedding for patch ``(h, w)`` positions.

    A quarter of the head's frequencies rotate with the row, a quarter with the column; the
    half-split (rotate-half) layout repeats that ``[row, column]`` block twice.
    """
    quarter = head_dim // 4
    inv = 1.0 / theta ** (jnp.arange(quarter, dtype=jnp.float32) * 2 / (head_dim // 2))
    hw = positions[..., 1:3].astype(jnp.float32)
    ang = (hw[..., :, None] * inv).reshape(*hw.shape[:-1], 2 * quarter)  # [row, col] freqs
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def attention_keys(positions: jnp.ndarray, segment_ids: jnp.ndarray,
                   window_patches: int = 0) -> jnp.ndarray:
    """Per patch, the ints two patches must share to attend to each other ``[B, N, K]``.

    Always the segment and temporal slice; with ``window_patches`` also the window row and
    column. Padding (segment 0) shares keys only with padding.
    """
    seg = segment_ids.astype(jnp.int32)
    t = jnp.where(seg > 0, positions[..., 0], 0)
    keys = [seg, t]
    if window_patches:
        keys += [jnp.where(seg > 0, positions[..., i] // window_patches, 0) for i in (1, 2)]
    return jnp.stack(keys, axis=-1).astype(jnp.int32)


def keys_mask(keys: jnp.ndarray) -> jnp.ndarray:
    """Bool ``[B, N, N]``: True where query and key patch have equal keys."""
    return jnp.all(keys[:, :, None, :] == keys[:, None, :, :], axis=-1)


def window_order(positions: jnp.ndarray, segment_ids: jnp.ndarray, config: QwenVisionConfig
                 ) -> jnp.ndarray:
    """Permutation ``[B, N / m^2]`` of merged tokens that makes each window contiguous.

    Tokens are ordered by segment (padding last), temporal slice, window row, window column,
    then their original order, which is transformers' window index. Attention results do not
    depend on the order (the mask carries the windows); contiguous windows are what lets a
    block-sparse attention kernel skip the masked blocks.
    """
    u = config.merge_unit
    b, n = segment_ids.shape
    first = positions.reshape(b, n // u, u, 3)[:, :, 0]
    seg = segment_ids.reshape(b, n // u, u)[:, :, 0]
    seg = jnp.where(seg > 0, seg, jnp.iinfo(jnp.int32).max)
    wp = config.window_patches
    idx = jnp.broadcast_to(jnp.arange(n // u), (b, n // u))
    sort = jax.vmap(lambda *k: jnp.lexsort(k))
    return sort(idx, first[..., 2] // wp, first[..., 1] // wp, first[..., 0], seg)


def _gather_units(x: jnp.ndarray, order: jnp.ndarray, unit: int) -> jnp.ndarray:
    """Reorders ``x`` ``[B, N, ...]`` by groups of ``unit`` rows along ``order`` ``[B, N/unit]``."""
    b, n = x.shape[:2]
    xs = x.reshape(b, n // unit, unit, *x.shape[2:])
    idx = order.reshape(b, n // unit, *(1,) * (xs.ndim - 2))
    out = jnp.take_along_axis(xs, idx, axis=1).reshape(x.shape)
    # Rows move within their example only: keep the gather local to each batch shard.
    return nn.with_logical_constraint(out, ("batch",) + (None,) * (x.ndim - 1))


def _dense(mod, name, x, shape, axes, bias_axes, spec, c, n_in=1):
    """``einsum(spec, x, w) + b``; the first ``n_in`` axes of ``w`` are its inputs (fan-in)."""
    init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)),
                                        out_axis=tuple(range(n_in, len(shape))))
    w = L.param_with_axes(mod, name, init, shape, c.param_dtype, axes)
    b = L.param_with_axes(mod, name + "_bias", nn.initializers.zeros,
                          tuple(shape[-len(bias_axes):]), c.param_dtype, bias_axes)
    return jnp.einsum(spec, x.astype(c.dtype), w.astype(c.dtype)) + b.astype(c.dtype)


def _norm(c: QwenVisionConfig, name: str):
    if c.variant == "qwen2_vl":
        return LayerNorm(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name=name)
    return L.RMSNorm(eps=c.norm_eps, axis_name="vision_embed", dtype=c.dtype,
                     param_dtype=c.param_dtype, name=name)


class QwenVisionAttention(nn.Module):
    """Self-attention with a fused qkv projection and the 2D rotary embedding."""

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        """x ``[B, N, W]``, cos/sin ``[B, N, D]``, mask bool ``[B, N, N]``."""
        c = self.config
        hd = (c.num_heads, c.head_dim)
        qkv = _dense(self, "qkv", x, (c.width, 3, *hd),
                     ("vision_embed", None, "vision_heads", "head_dim"),
                     (None, "vision_heads", "head_dim"), "bnw,wthd->bnthd", c)
        # Rotary in float32, as transformers does, whatever the compute dtype.
        q = L.apply_rope(qkv[:, :, 0].astype(jnp.float32), cos, sin).astype(c.dtype)
        k = L.apply_rope(qkv[:, :, 1].astype(jnp.float32), cos, sin).astype(c.dtype)
        q = nn.with_logical_constraint(q, ("batch", "vision_length", "vision_heads", "head_dim"))
        # Plain XLA attention over a dense bool mask (jax picks fused kernels where it can).
        out = jax.nn.dot_product_attention(q, k, qkv[:, :, 2], mask=mask[:, None],
                                           scale=c.head_dim ** -0.5)
        out = nn.with_logical_constraint(out, ("batch", "vision_length", "vision_heads",
                                               "head_dim"))
        return _dense(self, "o", out, (*hd, c.width), ("vision_heads", "head_dim", "vision_embed"),
                      ("vision_embed",), "bnhd,hdw->bnw", c, n_in=2)


class QwenVisionMLP(nn.Module):
    """Qwen2-VL: ``fc2(act(fc1 x))``; Qwen2.5-VL: ``down(act(gate x) * up x)``; with biases."""

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, x):
        """Applies the MLP to ``x`` ``[B, N, W]``."""
        c = self.config
        act = _ACTS[c.activation]
        up_axes, down_axes = ("vision_embed", "vision_mlp"), ("vision_mlp", "vision_embed")
        shape_up, shape_down = (c.width, c.mlp_dim), (c.mlp_dim, c.width)
        if c.variant == "qwen2_vl":
            h = act(_dense(self, "fc1", x, shape_up, up_axes, ("vision_mlp",), "bnw,wm->bnm", c))
            down = "fc2"
        else:
            g = _dense(self, "gate", x, shape_up, up_axes, ("vision_mlp",), "bnw,wm->bnm", c)
            u = _dense(self, "up", x, shape_up, up_axes, ("vision_mlp",), "bnw,wm->bnm", c)
            h, down = act(g) * u, "down"
        h = nn.with_logical_constraint(h, ("batch", "vision_length", "vision_mlp"))
        return _dense(self, down, h, shape_down, down_axes, ("vision_embed",), "bnm,mw->bnw", c)


class QwenVisionBlock(nn.Module):
    """Pre-norm block; fits ``nn.scan`` as ``(x, per_layer, shared) -> (x, None)``.

    ``per_layer``: ``{"full": bool}`` (whole-image or windowed attention);
    ``shared``: ``{"cos", "sin", "mask_full", "mask_window"}``.
    """

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, x, per_layer, shared):
        """Runs the block."""
        c = self.config
        mask = jnp.where(per_layer["full"], shared["mask_full"], shared["mask_window"])
        x = x + QwenVisionAttention(c, name="attn")(_norm(c, "norm1")(x), shared["cos"],
                                                    shared["sin"], mask)
        x = x + QwenVisionMLP(c, name="mlp")(_norm(c, "norm2")(x))
        return nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed")), None


class PatchMerger(nn.Module):
    """Norm, then ``m x m`` neighbouring patches concatenated and mapped by a 2-layer GELU MLP
    into the decoder's width."""

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, x):
        """``[B, N, W] -> [B, N / m^2, out_dim]`` (consecutive groups of ``m^2`` patches)."""
        c = self.config
        b, n, w = x.shape
        h = _norm(c, "norm")(x).reshape(b, n // c.merge_unit, c.merge_unit * w)
        hidden = c.merge_unit * w
        h = _dense(self, "fc1", h, (hidden, hidden), ("vision_embed", "vision_mlp"),
                   ("vision_mlp",), "bnw,wm->bnm", c)
        h = jax.nn.gelu(h, approximate=False)
        h = nn.with_logical_constraint(h, ("batch", "vision_length", "vision_mlp"))
        return _dense(self, "fc2", h, (hidden, c.out_dim), ("vision_mlp", "embed"), ("embed",),
                      "bnm,me->bne", c)


class QwenVisionEncoder(nn.Module):
    """Qwen2-VL / Qwen2.5-VL vision tower over a padded patch budget (module docstring)."""

    config: QwenVisionConfig

    @nn.compact
    def __call__(self, patches, positions, segment_ids):
        """Encodes the patches of one or more images/videos per example.

        Args:
          patches: float ``[B, N, C * tp * p * p]``, flattened as transformers' processor does
            (channel, frame, row, column), ``N`` a multiple of ``spatial_merge_size ** 2``.
          positions: int ``[B, N, 3]``: each patch's (t, h, w) in its own patch grid.
          segment_ids: int ``[B, N]``: 1, 2, ... per image/video, 0 for padding.

        Returns ``(tokens [B, N / m^2, out_dim], aux)``: one token per ``m x m`` merged patches
        in input order (padding tokens are zero); ``aux["token_mask"]`` bool ``[B, N / m^2]``
        marks real tokens and ``aux["hidden"]`` holds the last layer's patch states
        ``[B, N, W]`` (in input order, before the merger).
        """
        c = self.config
        b, n, d = patches.shape
        u, dt = c.merge_unit, c.dtype
        if d != c.patch_dim:
            raise ValueError(f"patches have {d} values each; this tower takes {c.patch_dim} "
                             f"(in_channels x temporal_patch_size x patch_size^2)")
        if n % u:
            raise ValueError(f"the patch budget N={n} is not a multiple of the merge unit {u}")
        if positions.shape != (b, n, 3) or segment_ids.shape != (b, n):
            raise ValueError(f"positions {positions.shape} / segment_ids {segment_ids.shape} do "
                             f"not fit patches {patches.shape}: expected {(b, n, 3)} / {(b, n)}")
        p, tp = c.patch_size, c.temporal_patch_size
        kernel = L.param_with_axes(self, "patch", nn.initializers.lecun_normal(),
                                   (tp, p, p, c.in_channels, c.width), c.param_dtype,
                                   (None, None, None, None, "vision_embed"))
        x = patches.astype(dt).reshape(b, n, c.in_channels, tp, p, p)
        x = jnp.einsum("bncspq,spqcw->bnw", x, kernel.astype(dt))
        x = nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed"))

        positions = positions.astype(jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        token_mask = segment_ids.reshape(b, n // u, u)[:, :, 0] > 0
        windowed = not all(c.full_layers)
        order = None
        if windowed:  # transformers' window reordering; undone after the merger
            order = window_order(positions, segment_ids, c)
            x, positions, segment_ids = (_gather_units(a, order, u)
                                         for a in (x, positions, segment_ids))
        x = nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed"))
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        mask_full = keys_mask(attention_keys(positions, segment_ids))
        mask_window = (keys_mask(attention_keys(positions, segment_ids, c.window_patches))
                       if windowed else mask_full)
        shared = {"cos": cos, "sin": sin, "mask_full": mask_full, "mask_window": mask_window}

        block = QwenVisionBlock
        if c.remat_policy != "none":
            block = nn.remat(QwenVisionBlock, policy=REMAT_POLICIES[c.remat_policy],
                             prevent_cse=not c.scan_layers)
        if c.scan_layers:
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(0, nn.broadcast), length=c.depth,
                           metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")(
                x, {"full": jnp.asarray(c.full_layers)}, shared)
        else:
            for i, full in enumerate(c.full_layers):
                x, _ = block(c, name=f"layers_{i}")(x, {"full": jnp.asarray(full)}, shared)

        tokens = PatchMerger(c, name="merger")(x)
        if order is not None:
            inverse = jnp.argsort(order, axis=-1)
            tokens = _gather_units(tokens, inverse, 1)
            x = _gather_units(x, inverse, u)
        tokens = jnp.where(token_mask[..., None], tokens, 0).astype(dt)
        tokens = nn.with_logical_constraint(tokens, ("batch", "vision_length", "embed"))
        return tokens, {"token_mask": token_mask, "hidden": x}
