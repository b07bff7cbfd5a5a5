"""The medvl_jax checkpoint directory of a converted (or trained) model.

Layout::

    DIR/params/            Orbax (StandardCheckpointer) checkpoint of the params pytree
    DIR/medvl_meta.json    {"schema_version": 1, "family": HF architecture name,
                            "model_config": our config as a dict, "hf_config": config.json}
    DIR/tokenizer/         tokenizer / generation / processor files, when the source had them

``family`` is the Hugging Face architecture name (e.g. "LlamaForCausalLM",
"PaliGemmaForConditionalGeneration"); text decoders get a :class:`DecoderConfig`, VLMs a
:class:`VLMConfig`, text encoders and two-tower models (``convert.text.ARCHITECTURES``) a
:class:`TextEncoderConfig` / :class:`TwoTowerConfig`. Loading never unpickles (Orbax + JSON
only).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from medvl_jax.cli_errors import UserError
from medvl_jax.convert import decoders as dec
from medvl_jax.convert import hf_io
from medvl_jax.convert import text as text_conv
from medvl_jax.convert import vlm as vlm_conv
from medvl_jax.models.decoder import Decoder, DecoderConfig
from medvl_jax.models.from_config import dataclass_from_dict
from medvl_jax.models.vision import VisionConfig
from medvl_jax.models.vlm import VLM, VLMConfig

SCHEMA_VERSION = 1
META_FILE = "medvl_meta.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
_DTYPE_NAMES = {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16",
                jnp.dtype(jnp.float16): "float16"}


class CheckpointError(UserError):
    """A checkpoint directory is missing files or describes something unsupported (a user
    error: the command lines report it on one line)."""


# The family of a VLM trained here whose layout has no Hugging Face counterpart (it generates
# and evaluates, but does not export; see medvl_jax.convert.workdir).
NATIVE_VLM = "MedvlJaxVLM"


def is_vlm_family(family: str) -> bool:
    """True for the VLM architectures, False for text decoders; raises for unknown names."""
    if family in vlm_conv.ARCHITECTURES or family == NATIVE_VLM:
        return True
    if family in dec.ARCHITECTURES:
        return False
    raise CheckpointError(f"unknown architecture {family!r}; supported: "
                          f"{sorted(dec.ARCHITECTURES) + sorted(vlm_conv.ARCHITECTURES)}")


def config_to_dict(config: DecoderConfig | VLMConfig) -> dict:
    """A JSON-able dict of a model config (dtypes as names, tuples as lists)."""
    def conv(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                v = conv(v)
            elif f.name in ("dtype", "param_dtype"):
                v = _DTYPE_NAMES[jnp.dtype(v)]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out
    return conv(config)


def config_from_dict(family: str, d: dict) -> DecoderConfig | VLMConfig:
    """Inverse of :func:`config_to_dict` for the given family."""
    if family in text_conv.ARCHITECTURES:
        return text_conv.config_from_dict(family, d)
    if not is_vlm_family(family):
        return dataclass_from_dict(DecoderConfig, d, "model_config")
    d = dict(d)
    vision = dataclass_from_dict(VisionConfig, d.pop("vision"), "model_config.vision")
    text = dataclass_from_dict(DecoderConfig, d.pop("text"), "model_config.text")
    return dataclass_from_dict(VLMConfig, {**d, "vision": vision, "text": text}, "model_config")


def model_for(config: DecoderConfig | VLMConfig):
    """The Flax module of a config."""
    if isinstance(config, text_conv.TextOrTwoTower):
        return text_conv.model_for(config)
    return VLM(config) if isinstance(config, VLMConfig) else Decoder(config)


def param_shapes(config: DecoderConfig | VLMConfig) -> dict:
    """Shapes/dtypes of the unboxed params of a config, without allocating them."""
    if isinstance(config, text_conv.TextOrTwoTower):
        return text_conv.param_shapes(config)
    if isinstance(config, VLMConfig):
        return vlm_conv.vlm_param_shapes(config)
    return dec.param_shapes(config)


def save_checkpoint(directory: str, params: Any, meta: dict) -> None:
    """Writes ``params`` (Orbax) and ``meta`` (JSON) into ``directory``.

    ``meta`` needs "family" and "model_config"; "schema_version" is set here.
    """
    for key in ("family", "model_config"):
        if key not in meta:
            raise CheckpointError(f"meta for {directory} lacks {key!r}")
    if meta["family"] not in text_conv.ARCHITECTURES:
        is_vlm_family(meta["family"])
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, PARAMS_DIR)
    if os.path.exists(target):
        raise CheckpointError(f"{target} already exists; choose an empty output directory")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, jax.tree.map(np.asarray, params))
    meta = {**meta, "schema_version": SCHEMA_VERSION}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def read_meta(directory: str) -> dict:
    """Reads and checks ``medvl_meta.json`` of a checkpoint directory."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: not a medvl_jax checkpoint (no {META_FILE})")
    meta = hf_io.read_json_file(path)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: schema_version {meta.get('schema_version')!r} is not "
                              f"{SCHEMA_VERSION}")
    for key in ("family", "model_config"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return meta


def load_checkpoint(directory: str):
    """Loads a checkpoint directory: returns ``(model, params, meta)``.

    ``model`` is the Flax module (its ``.config`` is the model config); params are restored
    with the shapes and dtypes the config implies.
    """
    directory = os.path.abspath(directory)
    meta = read_meta(directory)
    with hf_io.config_errors(directory, META_FILE):
        config = config_from_dict(meta["family"], meta["model_config"])
    target = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(target):
        raise CheckpointError(f"{directory}: no {PARAMS_DIR}/ directory with the weights")
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), param_shapes(config))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(target, abstract)
    except (ValueError, TypeError, KeyError) as e:  # Orbax: a leaf missing or mis-shaped.
        raise CheckpointError(f"{target}: the weights do not match {META_FILE}'s model "
                              f"({type(e).__name__}: {e})") from e
    return model_for(config), params, meta


def tokenizer_dir(directory: str) -> str | None:
    """The checkpoint's tokenizer directory, or None when it has none."""
    path = os.path.join(directory, TOKENIZER_DIR)
    return path if os.path.isdir(path) and os.listdir(path) else None
