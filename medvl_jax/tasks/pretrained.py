"""Starting a run from a converted checkpoint (``config.init_from``).

``init_from`` names a directory written by ``python -m medvl_jax.convert.from_hf`` (or by
``convert.workdir`` export): ``params/``, ``medvl_meta.json`` and ``tokenizer/``. Before the
task is built, :func:`resolve_config` completes the config from the checkpoint:

* ``config.model`` left empty (``ml_collections.ConfigDict()``) becomes the checkpoint's model
  config, written out as a model section (every field but ``image_token_id``, which
  ``from_config.vlm_config`` takes from the tokenizer); a non-empty section is kept and must
  describe the same model (checked by :func:`check_model` once the task is built);
* ``config.tokenizer`` left empty becomes the checkpoint's ``tokenizer/`` directory;
* ``data.image_size`` / ``data.num_image_tokens`` left ``None`` become the checkpoint's.

The completed config is what the run saves with its checkpoints, so a workdir never depends
on the converted directory to be rebuilt. Then :func:`load_params` checks the tokenizer and the
task's model config against the checkpoint and returns the weights for ``loop.train(...,
pretrained=...)``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from medvl_jax.convert import checkpoint_io
from medvl_jax.models import from_config
from medvl_jax.models.vlm import VLMConfig

# Fields that change how the model computes, not which weights it has: not compared.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy")


def checkpoint_config(directory: str) -> VLMConfig:
    """The VLM config of a converted checkpoint directory; a clear error for other models."""
    meta = checkpoint_io.read_meta(directory)
    config = checkpoint_io.config_from_dict(meta["family"], meta["model_config"])
    if not isinstance(config, VLMConfig):
        raise checkpoint_io.CheckpointError(
            f"init_from={directory}: {meta['family']} is not a vision-language model; "
            f"SFT needs a VLM checkpoint (PaliGemma, LLaVA, Gemma 3)")
    return config


def model_section(config: VLMConfig) -> dict:
    """``config`` as a ``config.model`` section (dtype names, lists; no ``image_token_id``)."""
    section = checkpoint_io.config_to_dict(config)
    section.pop("image_token_id")
    return section


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` completed from ``config.init_from`` (see the module docstring); unchanged
    when ``init_from`` is absent or empty. Returns a new, locked config."""
    directory = config.get("init_from") or ""
    if not directory:
        if "model" in config and not config.model:
            raise ValueError("config.model is empty and config.init_from is not set: pass "
                             "--config.init_from=DIR (a converted checkpoint, see "
                             "docs/finetune.md) or give a model section")
        return config
    directory = os.path.abspath(directory)
    ckpt = checkpoint_config(directory)
    out = ml_collections.ConfigDict(config.to_dict())
    out.init_from = directory
    if not config.get("model"):
        out.model = ml_collections.ConfigDict(model_section(ckpt))
    if not config.get("tokenizer"):
        tok = checkpoint_io.tokenizer_dir(directory)
        if tok is None:
            raise checkpoint_io.CheckpointError(
                f"init_from={directory} has no tokenizer/ directory; set config.tokenizer")
        out.tokenizer = tok
    if out.data.image_size is None and out.data.volume_shape is None:
        out.data.image_size = ckpt.vision.image_size
    if out.data.num_image_tokens is None:
        out.data.num_image_tokens = from_config.num_image_tokens(ckpt)
    out.lock()
    return out


def _first_difference(ours: Any, theirs: Any, prefix: str) -> tuple[str, Any, Any] | None:
    for f in dataclasses.fields(ours):
        if f.name in RUNTIME_FIELDS:
            continue
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if dataclasses.is_dataclass(a):
            diff = _first_difference(a, b, f"{prefix}{f.name}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{f.name}", a, b
    return None


def check_tokenizer(tokenizer, ckpt: VLMConfig, directory: str) -> None:
    """The tokenizer must fit the checkpoint's vocabulary and use its image token."""
    n = len(tokenizer)
    if n > ckpt.text.vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but init_from={directory} has a "
                         f"vocabulary of {ckpt.text.vocab_size}: tokenizer and checkpoint do "
                         f"not match (use the checkpoint's tokenizer/ directory)")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != ckpt.image_token_id:
        name = tokenizer.convert_ids_to_tokens(ckpt.image_token_id) if (
            0 <= ckpt.image_token_id < n) else None
        raise ValueError(f"the tokenizer's '<image>' token has id {image_id} but "
                         f"init_from={directory} expects image token id {ckpt.image_token_id} "
                         f"({name!r}); the data pipeline expands '<image>' placeholders into "
                         f"'<image>' tokens, so the two must be the same token")


def check_model(model_config: VLMConfig, ckpt: VLMConfig, directory: str) -> None:
    """Raises ValueError naming the first field (weights-relevant) where the run's model
    config differs from the checkpoint's."""
    diff = _first_difference(model_config, ckpt, "model.")
    if diff:
        field, ours, theirs = diff
        raise ValueError(f"{field}={ours!r} in the config but {theirs!r} in init_from="
                         f"{directory}; leave config.model empty to take the checkpoint's "
                         f"model, or make the section match it")


def load_params(directory: str, task) -> dict:
    """The checkpoint's params for ``task``, after checking its tokenizer and model config."""
    ckpt = checkpoint_config(directory)
    check_tokenizer(task.tokenizer, ckpt, directory)
    check_model(task.model_config, ckpt, directory)
    _, params, _ = checkpoint_io.load_checkpoint(directory)
    return params


def finetune_config(*, smoke: bool, template: str, prefix_lm: bool, max_length: int,
                    lr: float, steps: int) -> ml_collections.ConfigDict:
    """The common part of the ``configs/*_sft.py`` fine-tune configs: SFT on MedSynth chest
    radiographs from ``--config.init_from=DIR``, model, tokenizer and image size taken from
    the checkpoint (see :func:`resolve_config`). ``smoke``: a few steps on tiny data."""
    from medvl_jax.data import pipeline
    from medvl_jax.tasks import sft
    from medvl_jax.train import loop, optim

    c = ml_collections.ConfigDict()
    c.task = "sft"
    c.init_from = ""                        # Required: a converted checkpoint directory.
    c.tokenizer = ""                        # "": the checkpoint's tokenizer/.
    c.model = ml_collections.ConfigDict()   # Empty: the checkpoint's model config.

    c.data = pipeline.default_config()
    c.data.sources = {"cxr": pipeline.medsynth_source("cxr", num_studies=64 if smoke else 8000)}
    c.data.template = template
    c.data.prefix_lm = prefix_lm
    c.data.image_size = None                # None: the checkpoint's.
    c.data.num_image_tokens = None          # None: the checkpoint's.
    c.data.channels = 3
    c.data.max_images = 1
    c.data.max_length = 128 if smoke else max_length
    c.data.batch_size = 8 if smoke else 16

    c.sft = sft.default_config()
    c.sft.eval_studies = 2 if smoke else 60
    c.sft.eval_batch_size = 8 if smoke else 16

    c.optim = optim.default_config()
    c.optim.lr = 1e-3 if smoke else lr
    c.optim.warmup_steps = 1 if smoke else 50
    c.optim.weight_decay = 0.0

    c.train = loop.default_config()
    c.train.steps = 2 if smoke else steps
    c.train.log_every = 1 if smoke else 25
    c.train.checkpoint_every = 2 if smoke else 500
    return c
