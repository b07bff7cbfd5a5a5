"""Hugging Face <-> medvl_jax for the Qwen2-VL / Qwen2.5-VL vision tower.

``qwen_vision_mapping`` is the tower's part of the full models' mappings: inside
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` its tensors sit
under ``model.visual.`` (``visual.`` in checkpoints written before transformers 4.52), which
the ``prefix`` argument supplies. The standalone functions here read and write the tower alone
(``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformerPretrainedModel``
directories).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.convert import hf_io
from medvl_jax.convert.mapping import (CONV, DENSE, DENSE_OUT, Mapping, Rule, hf_to_ours,
                                       ours_to_hf)
from medvl_jax.models.qwen_vision import QwenVisionConfig, QwenVisionEncoder

# model_type of the tower's config (alone, or as the vision_config of the full model) -> variant
MODEL_TYPES = {"qwen2_vl_vision": "qwen2_vl", "qwen2_vl": "qwen2_vl",
               "qwen2_5_vl_vision": "qwen2_5_vl", "qwen2_5_vl": "qwen2_5_vl"}
ACTIVATIONS = ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh")


def _int(hf: dict, key: str, default: int) -> int:
    v = hf.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"vision config {key}={v}: only square patches are supported")
        v = v[0]
    return int(v)


def qwen_vision_config_from_hf(hf: dict, **overrides: Any) -> QwenVisionConfig:
    """Builds a :class:`QwenVisionConfig` from a Qwen2-VL / Qwen2.5-VL ``vision_config`` dict.

    The variant comes from ``model_type`` or, where that is missing, from the fields
    (``out_hidden_size`` exists only in Qwen2.5-VL).
    """
    mt = hf.get("model_type")
    if mt is not None and mt not in MODEL_TYPES:
        raise ValueError(f"unsupported vision model_type {mt!r}; supported: "
                         f"{', '.join(MODEL_TYPES)}")
    variant = MODEL_TYPES[mt] if mt else ("qwen2_5_vl" if "out_hidden_size" in hf else "qwen2_vl")
    act = hf.get("hidden_act", "quick_gelu" if variant == "qwen2_vl" else "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported vision hidden_act {act!r}; supported: {ACTIVATIONS}")
    rope = hf.get("rope_parameters") or {}
    kw: dict[str, Any] = dict(
        variant=variant, depth=hf.get("depth", 32), num_heads=hf.get("num_heads", 16),
        activation=act, in_channels=int(hf.get("in_channels", hf.get("in_chans", 3))),
        patch_size=_int(hf, "patch_size", 14),
        temporal_patch_size=_int(hf, "temporal_patch_size", 2),
        spatial_merge_size=hf.get("spatial_merge_size", 2),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if variant == "qwen2_vl":
        width = hf.get("embed_dim", 1280)
        kw.update(width=width, mlp_dim=int(width * hf.get("mlp_ratio", 4)),
                  out_dim=hf.get("hidden_size", 3584), window_size=0, fullatt_block_indexes=())
    else:
        kw.update(width=hf.get("hidden_size", 3584), mlp_dim=hf.get("intermediate_size", 3420),
                  out_dim=hf.get("out_hidden_size", 3584), window_size=hf.get("window_size", 112),
                  fullatt_block_indexes=tuple(hf.get("fullatt_block_indexes", (7, 15, 23, 31))),
                  tokens_per_second=hf.get("tokens_per_second", 4))
    kw.update(overrides)
    return QwenVisionConfig(**kw)


def qwen_vision_config_to_hf(c: QwenVisionConfig) -> dict:
    """The transformers ``vision_config`` dict of our config (the tower's own model_type)."""
    hf: dict[str, Any] = dict(
        depth=c.depth, num_heads=c.num_heads, hidden_act=c.activation, in_channels=c.in_channels,
        patch_size=c.patch_size, temporal_patch_size=c.temporal_patch_size,
        spatial_merge_size=c.spatial_merge_size,
        rope_parameters={"rope_theta": c.rope_theta, "rope_type": "axial"})
    if c.variant == "qwen2_vl":
        if c.mlp_dim % c.width:
            raise ValueError(f"Qwen2-VL stores mlp_ratio as an int: mlp_dim={c.mlp_dim} is not a "
                             f"multiple of width={c.width}")
        if c.window_size:
            raise ValueError("Qwen2-VL has no windowed attention: window_size must be 0")
        hf.update(model_type="qwen2_vl_vision", embed_dim=c.width,
                  mlp_ratio=c.mlp_dim // c.width, hidden_size=c.out_dim)
    else:
        hf.update(model_type="qwen2_5_vl_vision", hidden_size=c.width,
                  intermediate_size=c.mlp_dim, out_hidden_size=c.out_dim,
                  window_size=c.window_size, fullatt_block_indexes=list(c.fullatt_block_indexes),
                  tokens_per_second=c.tokens_per_second)
    return hf


def _linear(hf: str, ours: str, transform=DENSE) -> list[Rule]:
    return [Rule(f"{hf}.weight", ours, transform), Rule(f"{hf}.bias", f"{ours}_bias")]


def _norm(c: QwenVisionConfig, hf: str, ours: str) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", f"{ours}/scale")]
    if c.variant == "qwen2_vl":  # LayerNorm; Qwen2.5-VL's RMSNorm has no bias
        rules.append(Rule(f"{hf}.bias", f"{ours}/bias"))
    return rules


def qwen_vision_mapping(c: QwenVisionConfig, prefix: str = "", ours_prefix: str = "") -> Mapping:
    """Rules between transformers' vision tower tensors and ours; ``prefix`` (e.g.
    ``"model.visual."``) and ``ours_prefix`` nest it in a larger model.

    The fused qkv Linear ``[3W, W]`` becomes our ``attn/qkv [W, 3, H, D]`` (same row order:
    q, k, v, each heads x head_dim); the Conv3D kernel ``[W, C, tp, p, p]`` our
    ``patch [tp, p, p, C, W]``; ``merger.mlp.0`` / ``.2`` our ``merger/fc1`` / ``fc2``.
    """
    p, o = prefix, ours_prefix
    lay, mine = f"{p}blocks.{{i}}.", f"{o}layers/{{i}}/"
    if c.variant == "qwen2_vl":
        mlp = [*_linear(lay + "mlp.fc1", mine + "mlp/fc1"),
               *_linear(lay + "mlp.fc2", mine + "mlp/fc2")]
    else:
        mlp = [r for name in ("gate", "up", "down")
               for r in _linear(lay + f"mlp.{name}_proj", mine + f"mlp/{name}")]
    rules = [
        Rule(f"{p}patch_embed.proj.weight", f"{o}patch", CONV),
        *_norm(c, lay + "norm1", mine + "norm1"),
        *_norm(c, lay + "norm2", mine + "norm2"),
        *_linear(lay + "attn.qkv", mine + "attn/qkv"),
        *_linear(lay + "attn.proj", mine + "attn/o", DENSE_OUT),
        *mlp,
        *_norm(c, f"{p}merger.ln_q", f"{o}merger/norm"),
        *_linear(f"{p}merger.mlp.0", f"{o}merger/fc1"),
        *_linear(f"{p}merger.mlp.2", f"{o}merger/fc2"),
    ]
    return Mapping(tuple(rules), (r"inv_freq$",))


def qwen_vision_param_shapes(c: QwenVisionConfig) -> dict:
    """Shapes/dtypes of our (unboxed) tower params (nothing is allocated)."""
    n = c.merge_unit
    args = (jnp.zeros((1, n, c.patch_dim), jnp.float32), jnp.zeros((1, n, 3), jnp.int32),
            jnp.ones((1, n), jnp.int32))
    init = lambda: QwenVisionEncoder(c).init(jax.random.key(0), *args)["params"]  # noqa: E731
    return nn.meta.unbox(jax.eval_shape(init))


def load_hf_qwen_vision(model_dir: str, **overrides: Any) -> tuple[QwenVisionConfig, dict]:
    """Loads a saved Qwen2-VL / Qwen2.5-VL vision tower directory."""
    with hf_io.config_errors(model_dir):
        config = qwen_vision_config_from_hf(hf_io.read_json(model_dir), **overrides)
    params = hf_to_ours(hf_io.iter_checkpoint(model_dir), qwen_vision_mapping(config),
                        qwen_vision_param_shapes(config), scanned=config.scan_layers,
                        where=model_dir)
    return config, params


def save_hf_qwen_vision(params: dict, config: QwenVisionConfig, out_dir: str, *,
                        dtype: Any = None) -> None:
    """Writes our tower params as a transformers vision tower directory."""
    tensors = ours_to_hf(nn.meta.unbox(params), qwen_vision_mapping(config),
                         scanned=config.scan_layers,
                         dtype=None if dtype is None else np.dtype(dtype))
    hf_io.save_checkpoint(out_dir, tensors)
    hf_io.write_json(out_dir, qwen_vision_config_to_hf(config))
