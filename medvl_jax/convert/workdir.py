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

:func:`resolve` lets every command take either kind of directory: a workdir is exported once to
``<workdir>/export/step_<N>`` and that path is returned.
"""
from __future__ import annotations

import json
import os
import shutil
import jax
import ml_collections

from medvl_jax.convert import checkpoint_io
from medvl_jax.convert import vlm as vlm_conv
from medvl_jax.models.vlm import VLMConfig

CheckpointError = checkpoint_io.CheckpointError
EXPORT_DIR = "export"


def is_workdir(path: str) -> bool:
    """True when ``path`` is a training workdir (it has a ``checkpoints/`` folder)."""
    return os.path.isdir(os.path.join(path, "checkpoints"))


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


def _saved_config(manager, step: int) -> ml_collections.ConfigDict:
    meta = manager.read_metadata(step)
    cfg = meta.get("config")
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint step {step} has no saved config")
    return ml_collections.ConfigDict(cfg)


def restore_params(workdir: str, step: int | None = None):
    """``(config, task, params, step)`` of a workdir's checkpoint (newest by default).

    Only ``state.params`` is read from disk. ``params`` are the task's raw parameters (with a
    ``lora`` entry when the run used LoRA).
    """
    import flax.linen as nn

    from medvl_jax.train import checkpoint as ckpt_lib
    from medvl_jax.train import cli

    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{workdir}: no complete checkpoint under checkpoints/")
    config = _saved_config(manager, step)
    if config.get("task") not in cli.TASKS:
        raise CheckpointError(f"{workdir}: unknown task {config.get('task')!r}")
    task = cli.TASKS[config.task][0](config, cli.make_tokenizer(config))
    shapes = nn.unbox(jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(1)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes)
    params = manager.restore_params(step, target)
    return config, task, params, step


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None) -> str:
    """Writes checkpoint ``step`` (default: newest) of a training workdir to ``out_dir`` in the
    converted-checkpoint layout; returns ``out_dir``."""
    from medvl_jax.data import chat

    config, task, params, step = restore_params(workdir, step)
    model_params = task.model_params(params) if hasattr(task, "model_params") else params
    model_config = task.model_config
    init_from = config.get("init_from") or ""
    extra = {}
    if init_from:
        family = checkpoint_io.read_meta(init_from)["family"]
    else:
        try:
            family = hf_family(model_config)
        except CheckpointError as e:  # Still usable for generation and evaluation.
            family, extra = checkpoint_io.NATIVE_VLM, {"hf_export_error": str(e)}
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint_io.save_checkpoint(tmp, model_params, {
        "family": family, "model_config": checkpoint_io.config_to_dict(model_config),
        "source": {"workdir": os.path.abspath(workdir), "step": int(step)},
        "data_config": json.loads(config.data.to_json_best_effort()), **extra})
    tokenizer = task.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat.jinja_template(config.data.template)
    tokenizer.save_pretrained(os.path.join(tmp, checkpoint_io.TOKENIZER_DIR))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)  # Complete or absent: never a half-written export.
    return out_dir


def resolve(path: str) -> str:
    """A checkpoint directory for ``path``: itself, or a workdir's newest step exported to
    ``<workdir>/export/step_<N>`` (reused when it exists)."""
    if not is_workdir(path):
        return path
    from medvl_jax.train import checkpoint as ckpt_lib

    step = ckpt_lib.CheckpointManager(os.path.join(path, "checkpoints"),
                                      async_save=False).latest_step()
    if step is None:
        raise CheckpointError(f"{path}: no complete checkpoint under checkpoints/")
    out = os.path.join(path, EXPORT_DIR, f"step_{step}")
    if not os.path.isfile(os.path.join(out, checkpoint_io.META_FILE)):
        print(f"exporting {path} step {step} to {out}")
        export_workdir(path, out, step=step)
    return out


# Fields of a vision tower that must agree for its weights to mean the same thing in another
# model; the rest (token_merge, feature_layer, use_head, pos_init, dtypes) are the new model's
# own choices.
_TOWER_FIELDS = ("layout", "image_size", "patch_size", "num_channels", "width", "depth",
                 "num_heads", "mlp_dim", "activation", "norm_eps", "tubelet")


def vision_tower(directory: str, vision_config) -> dict:
    """The vision-tower weights of ``directory`` for a model whose tower is ``vision_config``:
    ``{"vision": {...}}`` without a pooling head the new model does not have.

    ``directory`` is a training workdir (newest checkpoint; contrastive or SFT, LoRA merged) or
    a converted checkpoint directory (a two-tower model such as SiglipModel, or a VLM). A tower
    that differs in a field that changes its weights' meaning raises, naming the field.
    """
    directory = os.path.abspath(directory)
    if is_workdir(directory):
        _, task, params, _ = restore_params(directory)
        if hasattr(task, "model_params"):
            params = task.model_params(params)
        theirs = task.model_config.vision
    elif os.path.isfile(os.path.join(directory, checkpoint_io.META_FILE)):
        model, params, _ = checkpoint_io.load_checkpoint(directory)
        theirs = getattr(model.config, "vision", None)
    else:
        raise CheckpointError(f"vision_init={directory}: neither a training workdir (no "
                              f"checkpoints/) nor a converted checkpoint (no "
                              f"{checkpoint_io.META_FILE})")
    if theirs is None or "vision" not in params:
        raise CheckpointError(f"vision_init={directory}: the model has no vision tower")
    for field in _TOWER_FIELDS:
        a, b = getattr(vision_config, field), getattr(theirs, field)
        if a != b:
            raise ValueError(f"model.vision.{field}={a!r} but the vision tower in {directory} "
                             f"has {b!r}")
    tower = dict(params["vision"])
    if not vision_config.use_head:
        tower.pop("head", None)
    return {"vision": tower}
