"""Vision Transformers: SigLIP and CLIP layouts, 2D images and 3D/video tubelets.

Parameter layout (unscanned; ``scan_layers`` stacks ``layers_{i}`` into ``layers``)::

    embed/patch           [*tubelet, ph, pw, C, W]   (+ embed/patch_bias [W] for SigLIP)
    embed/pos             [N (+1 with a class token), W]
    embed/cls             [W]                         (CLIP)
    pre_norm/{scale,bias} [W]                         (CLIP)
    layers_{i}/norm1, norm2/{scale,bias}
    layers_{i}/attn/q,k,v [W, H, D] (+ *_bias [H, D]);  attn/o [H, D, W] (+ o_bias [W])
    layers_{i}/mlp/fc1    [W, M] (+ fc1_bias);  mlp/fc2 [M, W] (+ fc2_bias)
    post_norm/{scale,bias}
    head/probe [1, 1, W]; head/in_proj [W, 3, H, D] (+ in_proj_bias [3, H, D]);
    head/o [H, D, W] (+ o_bias); head/norm; head/mlp   (SigLIP MAP head)

Outputs follow Hugging Face: SigLIP returns post-normed tokens and the MAP-pooled vector;
CLIP returns the un-normed tokens (class token first) and the post-normed class token.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.models.attention import check_impl
from medvl_jax.models.decoder import REMAT_POLICIES
from medvl_jax.models.layers import attention, param_with_axes

Dtype = Any

_ACTS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of :class:`VisionEncoder`.

    ``layout``: "siglip" (patch bias, post-norm on tokens, optional MAP head) or "clip" (class
    token, pre-norm, post-norm on the class token only).
    ``tubelet``: temporal patch size for volumes/videos ``[B, T, H, W, C]`` (0 = 2D images).
    ``token_merge``: merge ``k x k`` neighbouring output tokens into one (channels concatenated).
    ``feature_layer``: which hidden state ``aux["features"]`` holds, indexed like Hugging Face's
    ``hidden_states`` (0 = embeddings, -1 = last layer, -2 = the one before; LLaVA uses -2).
    ``attention_impl``: "auto", "xla", "splash" or "cudnn" (``medvl_jax.models.attention``).
    """

    layout: str = "siglip"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    use_head: bool = False
    tubelet: int = 0
    token_merge: int = 1
    feature_layer: int = -1
    pos_init: str = "normal"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "auto"
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_impl(self.attention_impl)
        if self.layout not in ("siglip", "clip"):
            raise ValueError(f"layout must be 'siglip' or 'clip', got {self.layout!r}")
        if self.activation not in _ACTS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(_ACTS)}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        if self.pos_init not in ("normal", "sincos2d"):
            raise ValueError(f"pos_init must be 'normal' or 'sincos2d', got {self.pos_init!r}")

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def feature_depth(self) -> int:
        """Number of layers run before ``aux["features"]`` is taken."""
        k = self.feature_layer
        n = k if k >= 0 else self.depth + 1 + k
        if not 0 <= n <= self.depth:
            raise ValueError(f"feature_layer={k} out of range for depth={self.depth}")
        return n

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.num_heads


class LayerNorm(nn.Module):
    """LayerNorm with logically named scale and bias, computed in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Normalises the last axis."""
        w = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (w,), self.param_dtype,
                                ("vision_embed",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (w,), self.param_dtype,
                               ("vision_embed",))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _dense(mod, name, x, shape, axes, bias_shape, bias_axes, spec, cfg):
    init = nn.initializers.lecun_normal()
    w = param_with_axes(mod, name, init, shape, cfg.param_dtype, axes)
    y = jnp.einsum(spec, x.astype(cfg.dtype), w.astype(cfg.dtype))
    b = param_with_axes(mod, name + "_bias", nn.initializers.zeros, bias_shape, cfg.param_dtype,
                        bias_axes)
    return y + b.astype(cfg.dtype)


class VisionMLP(nn.Module):
    """fc1 -> activation -> fc2, with biases."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        """Applies the MLP."""
        c = self.config
        h = _dense(self, "fc1", x, (c.width, c.mlp_dim), ("vision_embed", "vision_mlp"),
                   (c.mlp_dim,), ("vision_mlp",), "...w,wm->...m", c)
        h = nn.with_logical_constraint(_ACTS[c.activation](h),
                                       ("batch", "vision_length", "vision_mlp"))
        return _dense(self, "fc2", h, (c.mlp_dim, c.width), ("vision_mlp", "vision_embed"),
                      (c.width,), ("vision_embed",), "...m,mw->...w", c)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x, kv=None):
        """Attends from ``x`` to ``kv`` (default ``x``)."""
        c = self.config
        kv = x if kv is None else kv
        hd = (c.num_heads, c.head_dim)
        axes = ("vision_embed", "vision_heads", "head_dim")
        baxes = ("vision_heads", "head_dim")
        q = _dense(self, "q", x, (c.width, *hd), axes, hd, baxes, "blw,whd->blhd", c)
        k = _dense(self, "k", kv, (c.width, *hd), axes, hd, baxes, "blw,whd->blhd", c)
        v = _dense(self, "v", kv, (c.width, *hd), axes, hd, baxes, "blw,whd->blhd", c)
        out = attention(q, k, v, None, scale=c.head_dim ** -0.5, impl=c.attention_impl)
        return _dense(self, "o", out, (*hd, c.width), ("vision_heads", "head_dim", "vision_embed"),
                      (c.width,), ("vision_embed",), "blhd,hdw->blw", c)


class VisionBlock(nn.Module):
    """Pre-norm transformer block; signature ``(x, _) -> (x, None)`` fits ``nn.scan``."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x, _=None):
        """Runs the block."""
        c = self.config
        ln = dict(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        x = x + VisionAttention(c, name="attn")(LayerNorm(name="norm1", **ln)(x))
        x = x + VisionMLP(c, name="mlp")(LayerNorm(name="norm2", **ln)(x))
        x = nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed"))
        return x, (x if c.feature_layer != -1 else None)


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens (SigLIP)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        """Pools ``[B, N, W]`` to ``[B, W]``."""
        c = self.config
        probe = param_with_axes(self, "probe", nn.initializers.normal(1.0), (1, 1, c.width),
                                c.param_dtype, (None, None, "vision_embed"))
        hd = (c.num_heads, c.head_dim)
        qkv_w = param_with_axes(self, "in_proj", nn.initializers.lecun_normal(),
                                (c.width, 3, *hd), c.param_dtype,
                                ("vision_embed", None, "vision_heads", "head_dim"))
        qkv_b = param_with_axes(self, "in_proj_bias", nn.initializers.zeros, (3, *hd),
                                c.param_dtype, (None, "vision_heads", "head_dim"))
        dt = c.dtype
        p = jnp.broadcast_to(probe.astype(dt), (x.shape[0], 1, c.width))
        q = jnp.einsum("blw,whd->blhd", p, qkv_w[:, 0].astype(dt)) + qkv_b[0].astype(dt)
        k = jnp.einsum("blw,whd->blhd", x.astype(dt), qkv_w[:, 1].astype(dt)) + qkv_b[1].astype(dt)
        v = jnp.einsum("blw,whd->blhd", x.astype(dt), qkv_w[:, 2].astype(dt)) + qkv_b[2].astype(dt)
        out = attention(q, k, v, None, scale=c.head_dim ** -0.5, impl=c.attention_impl)
        h = _dense(self, "o", out, (*hd, c.width), ("vision_heads", "head_dim", "vision_embed"),
                   (c.width,), ("vision_embed",), "blhd,hdw->blw", c)
        h = h + VisionMLP(c, name="mlp")(LayerNorm(c.norm_eps, dt, c.param_dtype, name="norm")(h))
        return h[:, 0]


def cubic_resize_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """``[n_out, n_in]`` matrix of 1-D bicubic resampling (half-pixel centres, edge clamp).

    Matches ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``.
    """
    def w(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for k in range(-1, 3):
            m[o, min(max(base + k, 0), n_in - 1)] += w(k - t)
    return m


def resample_pos_embedding(pos: jnp.ndarray, grid_in: int,
                           grid_out: tuple[int, int]) -> jnp.ndarray:
    """Bicubically resamples a ``[grid_in**2, W]`` table to ``[gh * gw, W]``."""
    if (grid_in, grid_in) == tuple(grid_out):
        return pos
    table = pos.reshape(grid_in, grid_in, -1).astype(jnp.float32)
    mh = jnp.asarray(cubic_resize_matrix(grid_in, grid_out[0]), jnp.float32)
    mw = jnp.asarray(cubic_resize_matrix(grid_in, grid_out[1]), jnp.float32)
    out = jnp.einsum("hi,ijw,gj->hgw", mh, table, mw)
    return out.reshape(grid_out[0] * grid_out[1], -1).astype(pos.dtype)


def inflate_patch_kernel(kernel2d: jnp.ndarray, tubelet: int, mode: str = "average") -> jnp.ndarray:
    """Turns a 2D patch kernel ``[ph, pw, C, W]`` into a tubelet kernel ``[t, ph, pw, C, W]``.

    "average" repeats it divided by ``t`` and "center" puts it on the middle frame; both give
    the 2D embedding back for a video whose frames are all equal.
    """
    if mode == "average":
        return jnp.broadcast_to(kernel2d / tubelet, (tubelet, *kernel2d.shape))
    if mode == "center":
        out = jnp.zeros((tubelet, *kernel2d.shape), kernel2d.dtype)
        return out.at[tubelet // 2].set(kernel2d)
    raise ValueError(f"mode must be 'average' or 'center', got {mode!r}")


def merge_tokens(x: jnp.ndarray, grid_h: int, grid_w: int, k: int = 2) -> jnp.ndarray:
    """Merges ``k x k`` neighbouring tokens: ``[B, gh*gw, W] -> [B, gh*gw/k^2, k*k*W]``."""
    b, n, w = x.shape
    if n != grid_h * grid_w or grid_h % k or grid_w % k:
        raise ValueError(f"cannot merge {k}x{k} tokens of a {grid_h}x{grid_w} grid ({n} tokens)")
    x = x.reshape(b, grid_h // k, k, grid_w // k, k, w).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (grid_h // k) * (grid_w // k), k * k * w)


def sincos2d_init(grid: int, *, clip: bool = False, temperature: float = 10000.0):
    """Initialiser of a learned position table with fixed 2D sine-cosine values (as in MAE):
    a quarter of the channels each for sin/cos of the row and of the column. Training from
    scratch starts with every patch knowing where it is; the table stays a normal parameter
    (same layout as Hugging Face's, so export is unaffected). A CLIP class slot gets zeros."""
    def init(key, shape, dtype=jnp.float32):
        del key
        n, width = shape
        if width % 4:
            raise ValueError(f"sincos2d position init needs a width divisible by 4, got {width}")
        q = width // 4
        omega = 1.0 / temperature ** (np.arange(q) / q)
        rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        r = rows.reshape(-1, 1) * omega[None]
        c = cols.reshape(-1, 1) * omega[None]
        table = np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)
        if clip:
            table = np.concatenate([np.zeros((1, width)), table])
        if table.shape != (n, width):
            raise ValueError(f"position table shape {shape} does not fit a {grid}x{grid} grid")
        return jnp.asarray(table, dtype)
    return init


class VisionEncoder(nn.Module):
    """ViT over images ``[B, H, W, C]`` or volumes/videos ``[B, T, H, W, C]`` (with tubelets).

    ``__call__`` returns ``(tokens [B, N, W'], aux)`` with ``aux["pooled"]`` (MAP head output
    for SigLIP with a head, the normed class token for CLIP), ``aux["grid"]`` (t, h, w) and,
    when ``feature_layer != -1``, ``aux["features"]`` (an intermediate hidden state).
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, images):
        c = self.config
        p, dt = c.patch_size, c.dtype
        x = images.astype(dt)
        if c.tubelet:
            b, t, h, w, ch = x.shape
            gt, gh, gw = t // c.tubelet, h // p, w // p
            x = x[:, : gt * c.tubelet, : gh * p, : gw * p]
            x = x.reshape(b, gt, c.tubelet, gh, p, gw, p, ch).transpose(0, 1, 3, 5, 2, 4, 6, 7)
            kshape, spec = (c.tubelet, p, p, ch, c.width), "bthwspqc,spqcd->bthwd"
        else:
            b, h, w, ch = x.shape
            gt, gh, gw = 1, h // p, w // p
            x = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5)
            x = x[:, None]
            kshape, spec = (p, p, ch, c.width), "bthwpqc,pqcd->bthwd"
        kernel = param_with_axes(self, "patch", nn.initializers.lecun_normal(), kshape,
                                 c.param_dtype, (None,) * (len(kshape) - 1) + ("vision_embed",))
        x = jnp.einsum(spec, x, kernel.astype(dt))
        if c.layout == "siglip":
            bias = param_with_axes(self, "patch_bias", nn.initializers.zeros, (c.width,),
                                   c.param_dtype, ("vision_embed",))
            x = x + bias.astype(dt)
        n_pos = c.grid ** 2 + (c.layout == "clip")
        pos_init = nn.initializers.normal(0.02)
        if c.pos_init == "sincos2d":
            pos_init = sincos2d_init(c.grid, clip=c.layout == "clip")
        pos = param_with_axes(self, "pos", pos_init, (n_pos, c.width),
                              c.param_dtype, (None, "vision_embed"))
        patch_pos = pos[1:] if c.layout == "clip" else pos
        patch_pos = resample_pos_embedding(patch_pos, c.grid, (gh, gw)).astype(dt)
        x = x + patch_pos.reshape(1, 1, gh, gw, c.width)
        x = x.reshape(b, gt * gh * gw, c.width)
        if c.layout == "clip":
            cls = param_with_axes(self, "cls", nn.initializers.normal(0.02), (c.width,),
                                  c.param_dtype, ("vision_embed",))
            cls = (cls + pos[0]).astype(dt)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.width)), x], axis=1)
        ln = dict(eps=c.norm_eps, dtype=dt, param_dtype=c.param_dtype)
        if c.layout == "clip":
            x = LayerNorm(name="pre_norm", **ln)(x)
        x = nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed"))

        block = VisionBlock
        if c.remat_policy != "none":
            block = nn.remat(VisionBlock, policy=REMAT_POLICIES[c.remat_policy],
                             prevent_cse=not c.scan_layers)
        embedded = x
        if c.scan_layers:
            x, hidden = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                                length=c.depth, metadata_params={nn.PARTITION_NAME: "layers"}
                                )(c, name="layers")(x, None)
        else:
            hidden = []
            for i in range(c.depth):
                x, h = block(c, name=f"layers_{i}")(x)
                hidden.append(h)
        post = LayerNorm(name="post_norm", **ln)
        aux: dict[str, Any] = {"grid": (gt, gh, gw)}
        if c.feature_layer != -1:
            n = c.feature_depth
            aux["features"] = embedded if n == 0 else hidden[n - 1]
        if c.layout == "clip":
            aux["pooled"] = post(x[:, 0])
            tokens = x
        else:
            tokens = post(x)
            if c.use_head:
                aux["pooled"] = MAPHead(c, name="head")(tokens)
        if c.token_merge > 1:
            if c.layout == "clip" or gt != 1:
                raise ValueError("token_merge needs 2D SigLIP-layout tokens")
            tokens = merge_tokens(tokens, gh, gw, c.token_merge)
        return tokens, aux
