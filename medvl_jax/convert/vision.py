"""Hugging Face <-> medvl_jax for SiglipVisionModel and CLIPVisionModel."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.convert import hf_io
from medvl_jax.convert.mapping import (CONV, COPY_ND, DENSE, DENSE_OUT, Mapping, Rule,
                                       Transform, hf_to_ours, ours_to_hf)
from medvl_jax.models.vision import VisionConfig, VisionEncoder

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}
_ACTS_BACK = {v: k for k, v in _ACTS.items()}
ARCHITECTURES = {"SiglipVisionModel": "siglip", "CLIPVisionModel": "clip"}
MODEL_TYPES = ("siglip_vision_model", "clip_vision_model")  # A missing one reads as SigLIP.


def vision_config_from_hf(hf: dict, **overrides: Any) -> VisionConfig:
    """Builds a :class:`VisionConfig` from an HF SigLIP/CLIP vision config dict."""
    mt = hf.get("model_type", "")
    if mt and mt not in MODEL_TYPES:
        raise ValueError(f"unsupported vision model_type {mt!r}; supported: "
                         f"{', '.join(MODEL_TYPES)}")
    layout = "clip" if mt.startswith("clip") else "siglip"
    act = hf.get("hidden_act", "gelu_pytorch_tanh" if layout == "siglip" else "quick_gelu")
    if act not in _ACTS:
        raise ValueError(f"unsupported vision activation {act!r}")
    kw = dict(
        layout=layout, image_size=hf["image_size"], patch_size=hf["patch_size"],
        num_channels=hf.get("num_channels", 3), width=hf["hidden_size"],
        depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], activation=_ACTS[act],
        norm_eps=hf.get("layer_norm_eps", 1e-6 if layout == "siglip" else 1e-5),
        use_head=layout == "siglip" and bool(hf.get("vision_use_head", True)),
    )
    kw.update(overrides)
    return VisionConfig(**kw)


def vision_config_to_hf(c: VisionConfig) -> dict:
    """An HF config dict (SiglipVisionModel or CLIPVisionModel) for our config."""
    hf = dict(
        hidden_size=c.width, image_size=c.image_size, patch_size=c.patch_size,
        num_channels=c.num_channels, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim, hidden_act=_ACTS_BACK[c.activation],
        layer_norm_eps=c.norm_eps, dtype=str(jnp.dtype(c.param_dtype)))
    if c.layout == "siglip":
        hf.update(architectures=["SiglipVisionModel"], model_type="siglip_vision_model",
                  vision_use_head=c.use_head)
    else:
        hf.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    return hf


def _ln(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}/scale"), Rule(f"{hf}.bias", f"{ours}/bias")]


def _linear(hf: str, ours: str, transform: Transform = DENSE) -> list[Rule]:
    return [Rule(f"{hf}.weight", ours, transform), Rule(f"{hf}.bias", f"{ours}_bias")]


def vision_mapping(c: VisionConfig, prefix: str = "", ours_prefix: str = "") -> Mapping:
    """Rules for a SigLIP/CLIP vision tower; prefixes nest it in a larger model."""
    if c.tubelet:
        raise ValueError("tubelet kernels have no HF counterpart; inflate after loading")
    p, o = prefix, ours_prefix
    lay, mine = f"{p}encoder.layers.{{i}}.", f"{o}layers/{{i}}/"
    rules = [
        Rule(f"{p}embeddings.patch_embedding.weight", f"{o}patch", CONV),
        Rule(f"{p}embeddings.position_embedding.weight", f"{o}pos", COPY_ND),
        *_ln(f"{p}post_layernorm", f"{o}post_norm"),
        *_ln(lay + "layer_norm1", mine + "norm1"),
        *_ln(lay + "layer_norm2", mine + "norm2"),
        *[r for x in "qkv" for r in _linear(lay + f"self_attn.{x}_proj", mine + f"attn/{x}")],
        *_linear(lay + "self_attn.out_proj", mine + "attn/o", DENSE_OUT),
        *_linear(lay + "mlp.fc1", mine + "mlp/fc1"),
        *_linear(lay + "mlp.fc2", mine + "mlp/fc2"),
    ]
    if c.layout == "siglip":
        rules.append(Rule(f"{p}embeddings.patch_embedding.bias", f"{o}patch_bias"))
        if c.use_head:
            rules += [
                Rule(f"{p}head.probe", f"{o}head/probe", COPY_ND),
                Rule(f"{p}head.attention.in_proj_weight", f"{o}head/in_proj", DENSE),
                Rule(f"{p}head.attention.in_proj_bias", f"{o}head/in_proj_bias"),
                *_linear(f"{p}head.attention.out_proj", f"{o}head/o", DENSE_OUT),
                *_ln(f"{p}head.layernorm", f"{o}head/norm"),
                *_linear(f"{p}head.mlp.fc1", f"{o}head/mlp/fc1"),
                *_linear(f"{p}head.mlp.fc2", f"{o}head/mlp/fc2"),
            ]
    else:
        rules += [Rule(f"{p}embeddings.class_embedding", f"{o}cls"),
                  *_ln(f"{p}pre_layrnorm", f"{o}pre_norm")]
    ignore = [r"position_ids$"] + ([] if c.use_head else [r"(^|\.)head\."])
    return Mapping(tuple(rules), tuple(ignore))


def vision_param_shapes(c: VisionConfig) -> dict:
    """Shapes/dtypes of our (unboxed) vision params."""
    hw = (c.image_size, c.image_size, c.num_channels)
    images = jnp.zeros((1, c.tubelet, *hw) if c.tubelet else (1, *hw), jnp.float32)
    init = lambda: VisionEncoder(c).init(jax.random.key(0), images)["params"]  # noqa: E731
    return nn.meta.unbox(jax.eval_shape(init))


def _strip(tensors, prefix: str):
    for name, arr in tensors:
        yield (name[len(prefix):] if name.startswith(prefix) else name), arr


def load_hf_vision(model_dir: str, **overrides: Any) -> tuple[VisionConfig, dict]:
    """Loads a SiglipVisionModel/CLIPVisionModel dir (with or without "vision_model.")."""
    with hf_io.config_errors(model_dir):
        config = vision_config_from_hf(hf_io.read_json(model_dir), **overrides)
    tensors = _strip(hf_io.iter_checkpoint(model_dir), "vision_model.")
    params = hf_to_ours(tensors, vision_mapping(config), vision_param_shapes(config),
                        scanned=config.scan_layers, where=model_dir)
    return config, params


def save_hf_vision(params: dict, config: VisionConfig, out_dir: str, *, dtype: Any = None) -> None:
    """Writes our vision params as an HF SiglipVisionModel/CLIPVisionModel dir."""
    tensors = ours_to_hf(nn.meta.unbox(params), vision_mapping(config),
                         scanned=config.scan_layers,
                         dtype=None if dtype is None else np.dtype(dtype))
    hf_io.save_checkpoint(out_dir, tensors)
    hf_io.write_json(out_dir, vision_config_to_hf(config))

