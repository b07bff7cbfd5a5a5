"""Hugging Face <-> medvl_jax for text encoders and contrastive two-tower models.

Families: ``SiglipModel`` (vision + text + logit_scale/logit_bias -> :class:`TwoTower`),
``SiglipTextModel`` and ``BertModel`` (-> :class:`TextEncoder`). ``BertForMaskedLM`` and
``BertForPreTraining`` checkpoints (the form BiomedBERT / PubMedBERT are published in) import
as their ``BertModel`` encoder: the ``bert.`` prefix is dropped and the pre-training heads
(``cls.*``) are left out; they export as ``BertModel``.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvl_jax.convert import hf_io
from medvl_jax.convert.mapping import (COPY, COPY_ND, DENSE, DENSE_OUT, Mapping, Rule,
                                       hf_to_ours, ours_to_hf)
from medvl_jax.convert.vision import _linear, _ln, vision_config_from_hf, vision_config_to_hf
from medvl_jax.convert.vision import vision_mapping
from medvl_jax.models.from_config import dataclass_from_dict
from medvl_jax.models.text_encoder import TextEncoder, TextEncoderConfig
from medvl_jax.models.two_tower import TwoTower, TwoTowerConfig
from medvl_jax.models.vision import VisionConfig

# HF architecture -> the family it is stored and exported as.
ARCHITECTURES = {
    "SiglipModel": "SiglipModel",
    "SiglipTextModel": "SiglipTextModel",
    "BertModel": "BertModel",
    "BertForMaskedLM": "BertModel",
    "BertForPreTraining": "BertModel",
}
# Tokenizer files of these families that ``hf_io.SIDE_FILES`` does not list.
TOKENIZER_FILES = ("vocab.txt", "spiece.model")
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
         "quick_gelu": "quick_gelu"}
_ACTS_BACK = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu"}

TextOrTwoTower = TextEncoderConfig | TwoTowerConfig


# ----------------------------------------------------------------------------- configs


def _act(hf: dict, default: str) -> str:
    act = hf.get("hidden_act", default)
    if act not in _ACTS:
        raise ValueError(f"unsupported text activation {act!r}; supported: {sorted(_ACTS)}")
    return _ACTS[act]


def siglip_text_config_from_hf(hf: dict, **overrides: Any) -> TextEncoderConfig:
    """A SigLIP-layout :class:`TextEncoderConfig` from an HF SiglipTextConfig dict."""
    proj = hf.get("projection_size")
    kw = dict(layout="siglip", vocab_size=hf["vocab_size"],
              max_len=hf.get("max_position_embeddings", 64), width=hf["hidden_size"],
              depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
              mlp_dim=hf["intermediate_size"], activation=_act(hf, "gelu_pytorch_tanh"),
              norm_eps=hf.get("layer_norm_eps", 1e-6),
              projection_dim=None if proj in (None, hf["hidden_size"]) else proj)
    kw.update(overrides)
    return TextEncoderConfig(**kw)


def bert_config_from_hf(hf: dict, *, pooler: bool = True, **overrides: Any) -> TextEncoderConfig:
    """A BERT-layout :class:`TextEncoderConfig` from an HF BertConfig dict."""
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("only bidirectional BERT encoders (is_decoder=False, no cross "
                         "attention) are supported")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not "
                         f"supported (only 'absolute')")
    kw = dict(layout="bert", vocab_size=hf["vocab_size"],
              max_len=hf.get("max_position_embeddings", 512),
              type_vocab_size=hf.get("type_vocab_size", 2), width=hf["hidden_size"],
              depth=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
              mlp_dim=hf["intermediate_size"], activation=_act(hf, "gelu"),
              norm_eps=hf.get("layer_norm_eps", 1e-12), pooler=pooler)
    kw.update(overrides)
    return TextEncoderConfig(**kw)


def siglip_config_from_hf(hf: dict, **overrides: Any) -> TwoTowerConfig:
    """A :class:`TwoTowerConfig` from an HF SiglipConfig dict; overrides go to both towers
    (e.g. ``scan_layers``, ``remat_policy``, ``dtype``)."""
    vis = dict(hf.get("vision_config") or {})
    vis.setdefault("model_type", "siglip_vision_model")
    vision = vision_config_from_hf(vis, **overrides)
    text = siglip_text_config_from_hf(hf.get("text_config") or {}, **overrides)
    return TwoTowerConfig(vision=vision, text=text, logit_init="siglip")


def text_config_to_hf(c: TextEncoderConfig) -> dict:
    """An HF config dict (SiglipTextModel or BertModel) for our text encoder config."""
    common = dict(vocab_size=c.vocab_size, hidden_size=c.width, num_hidden_layers=c.depth,
                  num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
                  hidden_act=_ACTS_BACK[c.activation], layer_norm_eps=c.norm_eps,
                  max_position_embeddings=c.max_len, dtype=str(jnp.dtype(c.param_dtype)))
    if c.layout == "siglip":
        return dict(common, architectures=["SiglipTextModel"], model_type="siglip_text_model",
                    projection_size=c.out_dim)
    return dict(common, architectures=["BertModel"], model_type="bert",
                type_vocab_size=c.type_vocab_size, position_embedding_type="absolute")


def two_tower_config_to_hf(c: TwoTowerConfig) -> dict:
    """An HF SiglipModel config dict for our two-tower config (SigLIP layout only)."""
    _check_siglip_layout(c)
    vision, text = vision_config_to_hf(c.vision), text_config_to_hf(c.text)
    for d in (vision, text):
        d.pop("architectures", None)
    return dict(architectures=["SiglipModel"], model_type="siglip", vision_config=vision,
                text_config=text, dtype=text["dtype"])


def _check_siglip_layout(c: TwoTowerConfig) -> None:
    ok = (c.embed_dim is None and c.has_bias and c.image_pool == "pooled"
          and c.text_pool == "pooled" and c.vision.layout == "siglip" and c.vision.use_head
          and c.text.layout == "siglip" and c.text.pooler)
    if not ok:
        raise ValueError("only a two-tower model in SiglipModel's layout (SigLIP towers with "
                         "heads, no projections, pooled outputs, logit bias) has a Hugging "
                         "Face counterpart")
    if c.vision.scan_layers != c.text.scan_layers:
        raise ValueError("vision and text towers must both be scanned or both unscanned")


def config_from_dict(family: str, d: dict) -> TextOrTwoTower:
    """Rebuilds our config of ``family`` from its stored dict (``checkpoint_io`` format)."""
    if family == "SiglipModel":
        d = dict(d)
        vision = dataclass_from_dict(VisionConfig, d.pop("vision"), "model_config.vision")
        text = dataclass_from_dict(TextEncoderConfig, d.pop("text"), "model_config.text")
        return dataclass_from_dict(TwoTowerConfig, {**d, "vision": vision, "text": text},
                                   "model_config")
    return dataclass_from_dict(TextEncoderConfig, d, "model_config")


def model_for(config: TextOrTwoTower) -> nn.Module:
    """The Flax module of a config."""
    return TwoTower(config) if isinstance(config, TwoTowerConfig) else TextEncoder(config)


# ----------------------------------------------------------------------------- mappings


def text_mapping(c: TextEncoderConfig, prefix: str = "", ours_prefix: str = "") -> Mapping:
    """Rules for a SigLIP or BERT text encoder; prefixes nest it in a larger model."""
    p, o = prefix, ours_prefix
    if c.layout == "siglip":
        lay, mine = f"{p}encoder.layers.{{i}}.", f"{o}layers/{{i}}/"
        rules = [
            Rule(f"{p}embeddings.token_embedding.weight", f"{o}token_embed", COPY_ND),
            Rule(f"{p}embeddings.position_embedding.weight", f"{o}pos_embed", COPY_ND),
            *_ln(lay + "layer_norm1", mine + "norm1"),
            *_ln(lay + "layer_norm2", mine + "norm2"),
            *[r for x in "qkv" for r in _linear(lay + f"self_attn.{x}_proj", mine + f"attn/{x}")],
            *_linear(lay + "self_attn.out_proj", mine + "attn/o", DENSE_OUT),
            *_linear(lay + "mlp.fc1", mine + "mlp/fc1"),
            *_linear(lay + "mlp.fc2", mine + "mlp/fc2"),
            *_ln(f"{p}final_layer_norm", f"{o}final_norm"),
        ]
        head = f"{p}head"
    else:
        lay, mine = f"{p}encoder.layer.{{i}}.", f"{o}layers/{{i}}/"
        names = {"query": "q", "key": "k", "value": "v"}
        rules = [
            Rule(f"{p}embeddings.word_embeddings.weight", f"{o}token_embed", COPY_ND),
            Rule(f"{p}embeddings.position_embeddings.weight", f"{o}pos_embed", COPY_ND),
            Rule(f"{p}embeddings.token_type_embeddings.weight", f"{o}type_embed", COPY_ND),
            *_ln(f"{p}embeddings.LayerNorm", f"{o}embed_norm"),
            *[r for hf, x in names.items()
              for r in _linear(lay + f"attention.self.{hf}", mine + f"attn/{x}")],
            *_linear(lay + "attention.output.dense", mine + "attn/o", DENSE_OUT),
            *_ln(lay + "attention.output.LayerNorm", mine + "norm1"),
            *_linear(lay + "intermediate.dense", mine + "mlp/fc1"),
            *_linear(lay + "output.dense", mine + "mlp/fc2"),
            *_ln(lay + "output.LayerNorm", mine + "norm2"),
        ]
        head = f"{p}pooler.dense"
    if c.pooler:
        rules += _linear(head, f"{o}head", DENSE)
    return Mapping(tuple(rules), (r"(^|\.)position_ids$", r"(^|\.)token_type_ids$"))


def siglip_mapping(c: TwoTowerConfig) -> Mapping:
    """Rules of a whole SiglipModel (vision tower, text tower, logit scale and bias)."""
    _check_siglip_layout(c)
    vis = vision_mapping(c.vision, prefix="vision_model.", ours_prefix="vision/")
    txt = text_mapping(c.text, prefix="text_model.", ours_prefix="text/")
    top = (Rule("logit_scale", "logit_scale", COPY), Rule("logit_bias", "logit_bias", COPY))
    return Mapping(vis.rules + txt.rules + top, vis.ignore_hf + txt.ignore_hf)


def mapping_for(config: TextOrTwoTower) -> Mapping:
    """The rule list of a config (SiglipModel, SiglipTextModel or BertModel layout)."""
    if isinstance(config, TwoTowerConfig):
        return siglip_mapping(config)
    return text_mapping(config)


def _scanned(config: TextOrTwoTower) -> bool:
    if isinstance(config, TwoTowerConfig):
        return config.text.scan_layers
    return config.scan_layers


# ----------------------------------------------------------------------------- shapes


def param_shapes(config: TextOrTwoTower) -> dict:
    """Shapes/dtypes of our (unboxed) params of a text encoder or two-tower config."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    if isinstance(config, TwoTowerConfig):
        v = config.vision
        hw = (v.image_size, v.image_size, v.num_channels)
        images = jnp.zeros((1, v.tubelet, *hw) if v.tubelet else (1, *hw), jnp.float32)
        init = lambda: TwoTower(config).init(jax.random.key(0), images, tokens)  # noqa: E731
    else:
        init = lambda: TextEncoder(config).init(jax.random.key(0), tokens)  # noqa: E731
    return nn.meta.unbox(jax.eval_shape(init))["params"]


# ----------------------------------------------------------------------------- load / save


def _bert_names(tensors: Iterable[tuple[str, np.ndarray]], drop_heads: bool
                ) -> Iterator[tuple[str, np.ndarray]]:
    """Drops the ``bert.`` prefix, renames old LayerNorm ``gamma``/``beta``; with
    ``drop_heads`` leaves out the pre-training heads (``cls.*``)."""
    for name, arr in tensors:
        if drop_heads and name.startswith("cls."):
            continue
        if name.startswith("bert."):
            name = name[len("bert."):]
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        yield name, arr


def _strip(tensors, prefix: str):
    for name, arr in tensors:
        yield (name[len(prefix):] if name.startswith(prefix) else name), arr


def _hf_arch(hf: dict, where: str) -> str:
    for arch in hf.get("architectures") or []:
        if arch in ARCHITECTURES:
            return arch
    raise ValueError(f"{where}: unsupported architectures {hf.get('architectures')}; "
                     f"supported: {sorted(ARCHITECTURES)}")


def load_hf_text(model_dir: str, **overrides: Any) -> tuple[str, TextOrTwoTower, dict]:
    """Loads an HF SiglipModel / SiglipTextModel / Bert checkpoint dir.

    Returns ``(family, config, params)``; ``family`` is the architecture it exports as.
    Overrides (e.g. ``scan_layers=True``) go to the model config (both towers of SigLIP).
    Raises :class:`~medvl_jax.convert.mapping.ConversionError` naming missing, unexpected
    and mis-shaped tensors.
    """
    hf = hf_io.read_json(model_dir)
    arch = _hf_arch(hf, model_dir)
    family = ARCHITECTURES[arch]
    tensors: Iterable = hf_io.iter_checkpoint(model_dir)
    with hf_io.config_errors(model_dir):
        if family == "SiglipModel":
            config: TextOrTwoTower = siglip_config_from_hf(hf, **overrides)
        elif family == "SiglipTextModel":
            config = siglip_text_config_from_hf(hf, **overrides)
            tensors = _strip(tensors, "text_model.")
        else:
            names = {re.sub(r"^bert\.", "", n) for n, _ in hf_io.iter_checkpoint(model_dir)}
            config = bert_config_from_hf(hf, pooler="pooler.dense.weight" in names,
                                         **overrides)
            tensors = _bert_names(tensors, drop_heads=arch != "BertModel")
    params = hf_to_ours(tensors, mapping_for(config), param_shapes(config),
                        scanned=_scanned(config), where=model_dir)
    return family, config, params


def save_hf_text(params: dict, config: TextOrTwoTower, out_dir: str, *,
                 hf_config: dict | None = None, dtype: Any = None) -> str:
    """Writes our params as an HF SiglipModel / SiglipTextModel / BertModel dir.

    config.json is ``hf_config`` (with architectures set to the exported family) when given,
    else built from ``config``. Returns the exported architecture name.
    """
    tensors = ours_to_hf(nn.meta.unbox(params), mapping_for(config), scanned=_scanned(config),
                         dtype=None if dtype is None else np.dtype(dtype))
    hf_io.save_checkpoint(out_dir, tensors)
    if isinstance(config, TwoTowerConfig):
        built = two_tower_config_to_hf(config)
    else:
        built = text_config_to_hf(config)
    cfg = dict(hf_config) if hf_config else built
    cfg["architectures"] = built["architectures"]
    if dtype is not None:
        cfg["dtype"] = str(np.dtype(dtype))
    hf_io.write_json(out_dir, cfg)
    return built["architectures"][0]


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the tokenizer files of these families that ``hf_io.copy_side_files`` skips."""
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
