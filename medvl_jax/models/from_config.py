"""Model configs from ``ml_collections`` config sections (plain dicts of dataclass fields).

A config names model fields exactly as the dataclasses do; dtypes are strings ("float32",
"bfloat16"). An unknown field is an error that names it and lists the valid ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from medvl_jax.models.decoder import DecoderConfig
from medvl_jax.models.vision import VisionConfig
from medvl_jax.models.vlm import VLMConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dataclass_from_dict(cls, values: Mapping[str, Any], where: str):
    """``cls(**values)`` with dtype strings resolved and unknown fields named in the error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"{where}: unknown field(s) {unknown}; valid: {sorted(names)}")
    kwargs = {}
    for k, v in values.items():
        if k in ("dtype", "param_dtype") and isinstance(v, str):
            if v not in _DTYPES:
                raise ValueError(f"{where}.{k}: unknown dtype {v!r}; one of {sorted(_DTYPES)}")
            v = _DTYPES[v]
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def model_fields(section: str) -> set[str]:
    """Field names a config may set in ``section`` ("model", "model.vision", "model.text"),
    over every model family (VLM and two-tower); empty for any other section. They let
    ``--config.model.text.X=...`` set a field the config file leaves at its default."""
    from medvl_jax.models.text_encoder import TextEncoderConfig
    from medvl_jax.models.two_tower import TwoTowerConfig

    classes = {"model": (VLMConfig, TwoTowerConfig), "model.vision": (VisionConfig,),
               "model.text": (DecoderConfig, TextEncoderConfig)}.get(section, ())
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    if section == "model":
        names -= {"vision", "text", "image_token_id"}  # Sections, or set from the tokenizer.
    return names


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    """``n`` rounded up to a multiple of ``multiple``, so the vocabulary axis shards evenly."""
    return -(-n // multiple) * multiple


def vlm_config(model: Mapping[str, Any], *, vocab_size: int, image_token_id: int) -> VLMConfig:
    """A :class:`VLMConfig` from ``config.model`` = {"vision": {...}, "text": {...}, ...}.

    ``vocab_size`` (the tokenizer's length) and ``image_token_id`` come from the tokenizer, so
    the two cannot disagree. Without ``text.vocab_size`` in the config the embedding table gets
    ``vocab_size`` rounded up to a multiple of 128 (the extra rows are never targets); a given
    ``text.vocab_size`` must hold every token of the tokenizer.
    """
    model = dict(model)
    text = dict(model.pop("text"))
    if text.get("vocab_size", vocab_size) < vocab_size:
        raise ValueError(f"model.text.vocab_size={text['vocab_size']} but the tokenizer has "
                         f"{vocab_size} tokens")
    text.setdefault("vocab_size", padded_vocab_size(vocab_size))
    vision = dataclass_from_dict(VisionConfig, dict(model.pop("vision")), "model.vision")
    decoder = dataclass_from_dict(DecoderConfig, text, "model.text")
    return dataclass_from_dict(VLMConfig, {**model, "vision": vision, "text": decoder,
                                           "image_token_id": image_token_id}, "model")


def num_image_tokens(config: VLMConfig) -> int:
    """Decoder tokens one image becomes (what ``data.num_image_tokens`` must equal)."""
    v = config.vision
    if config.projector == "gemma3":
        return config.mm_tokens_per_image
    grid = v.image_size // v.patch_size
    n = (grid // v.token_merge) ** 2
    return n + (1 if v.layout == "clip" and not config.drop_cls else 0)
