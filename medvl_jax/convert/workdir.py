"""A training workdir as a medvl_jax checkpoint directory (for export, generation, evaluation).

The training loop writes ``<workdir>/checkpoints/<step>/{state, data, meta}``: the whole train
state plus the run's config. :func:`export_workdir` turns one step of it into the checkpoint
layout that ``convert.to_hf`` and ``generate`` read (see :mod:`medvl_jax.convert.checkpoint_io`):
only the model parameters are read (the optimizer state stays on disk), LoRA factors are merged
into the weights, and the tokenizer is written beside them with a chat template equal to the
one the model was trained with.

The Hugging Face architecture is the one the run started from (``init_from``'s family) or, for
a model trained from scratch, the one whose layout our config matches: a ``mlp2x_gelu``
projector is LLaVA, ``linear`` is PaliGemma, ``gemma3`` is Gemma 3. A model with no Hugging
Face counterpart (e.g. ``token_merge > 1``, a 3D tower) is exported as ``NATIVE_VLM``: it
generates and evaluates, and ``to_hf`` refuses it with the reason. The run's data config is
kept in the metadata (``data_config``) so generation prompts exactly as training did.

:func:`resolve` exports a workdir once to ``<workdir>/export/step_<N>`` for tools that read
that layout from disk; everything else opens either kind of directory with
:func:`medvl_jax.train.restore.load`.
"""
from __future__ import annotations

import json
import os
import shutil

from medvl_jax.convert import checkpoint_io
from medvl_jax.convert import vlm as vlm_conv
from medvl_jax.models.vlm import VLMConfig

CheckpointError = checkpoint_io.CheckpointError
EXPORT_DIR = "export"


def hf_family(config: VLMConfig) -> str:
    """The Hugging Face VLM architecture whose layout ``config`` matches; raises otherwise."""
    if config.vision.token_merge != 1:
        raise CheckpointError(f"model.vision.token_merge={config.vision.token_merge} has no "
                              f"Hugging Face counterpart; train with token_merge=1 to export")
    if config.vision.tubelet:
        raise CheckpointError("a 3D (tubelet) vision tower has no Hugging Face VLM counterpart")
    if config.projector == "mlp2x_gelu":
        if config.vision.layout == "siglip" and config.vision.feature_layer == -1:
            raise CheckpointError(
                "LLaVA feeds the projector a hidden state without SigLIP's final norm, but "
                "model.vision.feature_layer=-1 uses the normed output; set "
                f"model.vision.feature_layer={config.vision.depth} (the last layer) to export")
        return "LlavaForConditionalGeneration"
    if config.projector == "linear":
        return "PaliGemmaForConditionalGeneration"
    return "Gemma3ForConditionalGeneration"


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None) -> str:
    """Writes checkpoint ``step`` (default: newest) of a training workdir to ``out_dir`` in the
    converted-checkpoint layout; returns ``out_dir``."""
    from medvl_jax.data import chat
    from medvl_jax.train import restore

    ckpt = restore.load(workdir, step=step)
    config, model_config = ckpt.config, ckpt.model_config
    if not isinstance(model_config, VLMConfig):
        raise CheckpointError(f"{workdir}: a {config.task} run's {type(model_config).__name__} "
                              f"is not a vision-language model; only VLMs export here")
    init_from = config.get("init_from") or ""
    family = restore.load(init_from).family if init_from else ""
    extra = {}
    if not family:
        try:
            family = hf_family(model_config)
        except CheckpointError as e:  # Still usable for generation and evaluation.
            family, extra = checkpoint_io.NATIVE_VLM, {"hf_export_error": str(e)}
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint_io.save_checkpoint(tmp, ckpt.params, {
        "family": family, "model_config": checkpoint_io.config_to_dict(model_config),
        "source": {"workdir": os.path.abspath(workdir), "step": int(ckpt.step)},
        "data_config": json.loads(config.data.to_json_best_effort()), **extra})
    tokenizer = ckpt.task.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat.jinja_template(config.data.template)
    tokenizer.save_pretrained(os.path.join(tmp, checkpoint_io.TOKENIZER_DIR))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)  # Complete or absent: never a half-written export.
    return out_dir


def resolve(path: str) -> str:
    """A checkpoint directory for ``path``: itself, or a workdir's newest step exported to
    ``<workdir>/export/step_<N>`` (reused when it exists), for tools that read the converted
    layout from disk (``convert.to_hf``)."""
    from medvl_jax.train import restore

    if not restore.is_workdir(path):
        return path
    step = restore.latest_step(path)
    if step is None:
        raise CheckpointError(f"{path}: no complete checkpoint under checkpoints/")
    out = os.path.join(path, EXPORT_DIR, f"step_{step}")
    if not os.path.isfile(os.path.join(out, checkpoint_io.META_FILE)):
        print(f"exporting {path} step {step} to {out}")
        export_workdir(path, out, step=step)
    return out
