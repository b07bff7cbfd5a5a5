"""Bidirectional text encoders for contrastive towers: SigLIP's text transformer and BERT.

Parameter layout (unscanned; ``scan_layers`` stacks ``layers_{i}`` into ``layers``)::

    token_embed           [V, W]
    pos_embed             [max_len, W]
    type_embed            [T, W]            (BERT: token types)
    embed_norm/{scale,bias}                 (BERT: LayerNorm after the embeddings)
    layers_{i}/norm1, norm2/{scale,bias}    (SigLIP: before attention / MLP; BERT: after)
    layers_{i}/attn/q,k,v [W, H, D] (+ *_bias [H, D]);  attn/o [H, D, W] (+ o_bias [W])
    layers_{i}/mlp/fc1    [W, M] (+ fc1_bias);  mlp/fc2 [M, W] (+ fc2_bias)
    final_norm/{scale,bias}                 (SigLIP)
    head [W, P] (+ head_bias [P])           (SigLIP: projection of the last token;
                                             BERT: the pooler, tanh over [CLS])

The blocks reuse the vision encoder's LayerNorm and MLP (and therefore its logical axis
names: ``vision_embed``, ``vision_heads``, ``vision_mlp``, which the rules shard like the
decoder's); the token table is ``("vocab", "vision_embed")``.

Outputs follow Hugging Face's ``SiglipTextModel`` / ``BertModel``: ``(last_hidden_state,
pooler_output)``. An attention mask, when given, hides padded keys (both models); SigLIP's
pooled output is the last position whatever the mask says, as in Hugging Face (SigLIP is
trained on ``max_length``-padded text without a mask).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medvl_jax.models.attention import check_impl
from medvl_jax.models.decoder import REMAT_POLICIES
from medvl_jax.models.layers import attention, param_with_axes
from medvl_jax.models.masks import key_padding_mask
from medvl_jax.models.vision import _ACTS, LayerNorm, VisionConfig, VisionMLP, _dense

Dtype = Any
LAYOUTS = ("siglip", "bert")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Hyper-parameters of :class:`TextEncoder`.

    ``layout``: "siglip" (pre-LN blocks, final LayerNorm, pooled = ``head`` of the last token)
    or "bert" (token-type embeddings, embedding LayerNorm, post-LN blocks, pooled =
    ``tanh(head([CLS]))``).
    ``pooler``: whether the ``head`` Dense exists; without it the pooled output is the raw
    last (SigLIP) or first (BERT) hidden state.
    ``projection_dim``: output width of SigLIP's head (None = ``width``; BERT's is ``width``).
    ``attention_impl``: "auto", "xla", "splash" or "cudnn" (``medvl_jax.models.attention``).
    """

    layout: str = "siglip"
    vocab_size: int = 32000
    max_len: int = 64
    type_vocab_size: int = 2
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    pooler: bool = True
    projection_dim: int | None = None
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "auto"
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        check_impl(self.attention_impl)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.activation not in _ACTS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(_ACTS)}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        if self.layout == "bert" and self.projection_dim not in (None, self.width):
            raise ValueError("projection_dim is a SigLIP field; BERT's pooler keeps the width")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.width // self.num_heads

    @property
    def out_dim(self) -> int:
        """Width of the pooled output."""
        if self.layout == "siglip" and self.pooler and self.projection_dim:
            return self.projection_dim
        return self.width

    @property
    def block_config(self) -> VisionConfig:
        """The encoder-block hyper-parameters in the form the shared vision blocks take."""
        return VisionConfig(width=self.width, depth=self.depth, num_heads=self.num_heads,
                            mlp_dim=self.mlp_dim, activation=self.activation,
                            norm_eps=self.norm_eps, scan_layers=self.scan_layers,
                            remat_policy=self.remat_policy, attention_impl=self.attention_impl,
                            param_dtype=self.param_dtype, dtype=self.dtype)


class TextAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases and an optional key-padding mask.

    Same parameters as :class:`medvl_jax.models.vision.VisionAttention`.
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, x, mask=None):
        """``x`` ``[B, L, W]``; ``mask`` bool ``[B, L]`` (True = real token) or None."""
        c = self.config
        hd = (c.num_heads, c.head_dim)
        axes = ("vision_embed", "vision_heads", "head_dim")
        baxes = ("vision_heads", "head_dim")
        q = _dense(self, "q", x, (c.width, *hd), axes, hd, baxes, "blw,whd->blhd", c)
        k = _dense(self, "k", x, (c.width, *hd), axes, hd, baxes, "blw,whd->blhd", c)
        v = _dense(self, "v", x, (c.width, *hd), axes, hd, baxes, "blw,whd->blhd", c)
        m = None if mask is None else key_padding_mask(mask)
        out = attention(q, k, v, m, scale=c.head_dim ** -0.5, impl=c.attention_impl)
        return _dense(self, "o", out, (*hd, c.width), ("vision_heads", "head_dim", "vision_embed"),
                      (c.width,), ("vision_embed",), "blhd,hdw->blw", c)


class TextBlock(nn.Module):
    """Transformer block, pre-LN (SigLIP) or post-LN (BERT); ``(x, mask) -> (x, None)``."""

    config: VisionConfig
    post_norm: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        """Runs the block; ``mask`` as in :class:`TextAttention`."""
        c = self.config
        ln = dict(eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        attn, mlp = TextAttention(c, name="attn"), VisionMLP(c, name="mlp")
        norm1, norm2 = LayerNorm(name="norm1", **ln), LayerNorm(name="norm2", **ln)
        if self.post_norm:
            x = norm1(x + attn(x, mask))
            x = norm2(x + mlp(x))
        else:
            x = x + attn(norm1(x), mask)
            x = x + mlp(norm2(x))
        return nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed")), None


class TextEncoder(nn.Module):
    """SigLIP or BERT text encoder over token ids ``[B, L]``.

    ``__call__(tokens, mask=None, token_types=None)`` returns ``(hidden [B, L, W],
    pooled [B, out_dim])``. ``mask`` (1/True = real token) hides padded keys; ``token_types``
    (BERT segment ids) default to zeros.
    """

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, tokens, mask=None, token_types=None):
        c = self.config
        bc, dt = c.block_config, c.dtype
        b, length = tokens.shape
        if length > c.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={c.max_len}")
        emb = nn.initializers.normal(0.02)
        table = param_with_axes(self, "token_embed", emb, (c.vocab_size, c.width), c.param_dtype,
                                ("vocab", "vision_embed"))
        pos = param_with_axes(self, "pos_embed", emb, (c.max_len, c.width), c.param_dtype,
                              (None, "vision_embed"))
        x = jnp.take(table, tokens, axis=0).astype(dt) + pos[:length].astype(dt)[None]
        ln = dict(eps=c.norm_eps, dtype=dt, param_dtype=c.param_dtype)
        if c.layout == "bert":
            types = param_with_axes(self, "type_embed", emb, (c.type_vocab_size, c.width),
                                    c.param_dtype, (None, "vision_embed"))
            tt = jnp.zeros_like(tokens) if token_types is None else token_types
            x = LayerNorm(name="embed_norm", **ln)(x + jnp.take(types, tt, axis=0).astype(dt))
        x = nn.with_logical_constraint(x, ("batch", "vision_length", "vision_embed"))
        mask = None if mask is None else mask.astype(bool)

        block = TextBlock
        if c.remat_policy != "none":
            block = nn.remat(TextBlock, policy=REMAT_POLICIES[c.remat_policy],
                             prevent_cse=not c.scan_layers)
        post = c.layout == "bert"
        if c.scan_layers:
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=nn.broadcast, length=c.depth,
                           metadata_params={nn.PARTITION_NAME: "layers"}
                           )(bc, post, name="layers")(x, mask)
        else:
            for i in range(c.depth):
                x, _ = block(bc, post, name=f"layers_{i}")(x, mask)

        if c.layout == "siglip":
            x = LayerNorm(name="final_norm", **ln)(x)
            pooled = x[:, -1]
        else:
            pooled = x[:, 0]
        if c.pooler:
            out = c.out_dim
            pooled = _dense(self, "head", pooled, (c.width, out), ("vision_embed", None), (out,),
                            (None,), "bw,wo->bo", bc)
            if c.layout == "bert":
                pooled = jnp.tanh(pooled)
        return x, pooled
