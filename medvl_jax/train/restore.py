"""Opening a model from disk, the one way: a training workdir or a converted checkpoint.

Every command that takes a model takes either kind of directory — ``config.init_from`` and
``config.vision_init`` of a training run, ``python -m medvl_jax.evaluate --checkpoint``,
``python -m medvl_jax.generate --checkpoint``, and the exporters:

* a **training workdir** (``<dir>/checkpoints/<step>/``): the config saved with its newest
  (or a given) step rebuilds the task, and only ``state.params`` is read (the optimizer state
  stays on disk); LoRA factors are merged;
* a **converted checkpoint** (``python -m medvl_jax.convert.from_hf`` or an export):
  ``params/``, ``medvl_meta.json`` and ``tokenizer/``.

:func:`load` returns a :class:`Checkpoint` whose model config and tokenizer are read at once
and whose parameters are read on first use, so a run that resumes never loads the weights it
started from unless its task needs them (a DPO reference).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import ml_collections

from medvl_jax.config import ConfigError
from medvl_jax.convert import checkpoint_io
from medvl_jax.train import checkpoint as ckpt_lib

CheckpointError = checkpoint_io.CheckpointError
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class Checkpoint:
    """A model on disk.

    path: the absolute directory. step: the workdir's step (None for a converted checkpoint).
    model_config: the model's dataclass config. tokenizer: a tokenizer spec for
    ``pipeline.make_tokenizer`` (a directory, or a built-in name), "" for none.
    config: the training config saved in a workdir (None for a converted checkpoint).
    family: the converted checkpoint's family ("" for a workdir). data_config: the data
    section the model was trained with, when known (generation prompts as training did).
    task: the task rebuilt from a workdir's config (None for a converted checkpoint).
    """
    path: str
    step: int | None
    model_config: Any
    tokenizer: str
    config: ml_collections.ConfigDict | None
    family: str
    data_config: dict | None
    task: Any
    _read: Callable[[], Any] = dataclasses.field(repr=False)

    @functools.cached_property
    def params(self) -> Any:
        """The model's plain parameters (LoRA merged), read from disk on first use."""
        return self._read()

    @property
    def is_workdir(self) -> bool:
        return self.config is not None


def is_workdir(path: str) -> bool:
    """True when ``path`` is a training workdir (it has a ``checkpoints/`` folder)."""
    return os.path.isdir(os.path.join(path, CHECKPOINTS))


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step of a workdir, or None."""
    if not is_workdir(workdir):
        return None
    return _manager(workdir).latest_step()


def _manager(workdir: str) -> ckpt_lib.CheckpointManager:
    return ckpt_lib.CheckpointManager(os.path.join(workdir, CHECKPOINTS), async_save=False)


def saved_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """``(config, step)``: the config saved with a workdir's checkpoint (newest by default)."""
    manager = _manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{workdir}: no complete checkpoint under {CHECKPOINTS}/")
    cfg = manager.read_metadata(step).get("config")
    if isinstance(cfg, str):
        cfg = json.loads(cfg)
    if not isinstance(cfg, dict) or not cfg:
        raise CheckpointError(f"{workdir}: checkpoint step {step} has no saved config")
    return ml_collections.ConfigDict(cfg), step


def build_task(config: ml_collections.ConfigDict, start: Checkpoint | None = None):
    """The task of a complete config (its tokenizer made here), with the checkpoint its run
    started from (``config.init_from``, opened lazily: a preference or RL task's reference)
    when that is still on disk."""
    from medvl_jax import tasks
    from medvl_jax.data import pipeline

    init_from = config.get("init_from") or ""
    if start is None and init_from and os.path.exists(init_from):
        start = load(init_from)
    tokenizer = pipeline.make_tokenizer(config.tokenizer) if config.get("tokenizer") else None
    return tasks.get(config.task)(config, tokenizer, start=start)


def restore_params(workdir: str, step: int | None = None, *, config=None, mesh=None):
    """``(config, task, params, step)`` of a workdir's checkpoint (newest by default): the
    task's raw parameters (a ``lora`` entry when the run used LoRA), only ``state.params``
    read. ``config``: build the task from this config instead of the saved one. ``mesh``:
    place the parameters with the training shardings on this mesh (default: one device)."""
    import flax.linen as nn

    from medvl_jax.train import state as state_lib

    saved, step = saved_config(workdir, step)
    config = saved if config is None else config
    task = build_task(config)
    dummy = task.dummy_batch(1)
    if mesh is None:
        shapes = nn.unbox(jax.eval_shape(task.init, jax.random.key(0), dummy))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                              shapes)
    else:
        from medvl_jax.parallel import rules as rules_lib

        boxed, shapes = state_lib.abstract_params(task.init, jax.random.key(0), dummy)
        shardings = rules_lib.logical_shardings(boxed, mesh)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes, shardings)
    try:
        params = _manager(workdir).restore_params(step, target)
    except Exception as e:  # Orbax names the leaf; say which checkpoint and the likely why.
        raise ConfigError(f"cannot restore {workdir} step {step} with this config (model or "
                         f"LoRA settings differ from the run's?): {type(e).__name__}: "
                         f"{e}") from e
    return config, task, params, step


def load(path: str, *, step: int | None = None) -> Checkpoint:
    """The model in ``path``: a training workdir (its newest checkpoint, or ``step``) or a
    converted checkpoint directory; see the module docstring."""
    path = os.path.abspath(path)
    if is_workdir(path):
        config, step = saved_config(path, step)
        task = build_task(config)
        if task.model_config is None:
            raise CheckpointError(f"{path}: task {config.task!r} declares no model config")

        def read():
            _, _, raw, _ = restore_params(path, step, config=config)
            return task.model_params(raw)
        return Checkpoint(path=path, step=step, model_config=task.model_config,
                          tokenizer=str(config.get("tokenizer") or ""), config=config,
                          family="", data_config=config.data.to_dict() if "data" in config
                          else None, task=task, _read=read)
    if os.path.isfile(os.path.join(path, checkpoint_io.META_FILE)):
        meta = checkpoint_io.read_meta(path)
        model_config = checkpoint_io.config_from_dict(meta["family"], meta["model_config"])
        return Checkpoint(path=path, step=None, model_config=model_config,
                          tokenizer=checkpoint_io.tokenizer_dir(path) or "", config=None,
                          family=meta["family"], data_config=meta.get("data_config"), task=None,
                          _read=lambda: checkpoint_io.load_checkpoint(path)[1])
    raise CheckpointError(f"{path}: neither a training workdir (no {CHECKPOINTS}/ with a "
                          f"complete checkpoint) nor a converted checkpoint (no "
                          f"{checkpoint_io.META_FILE})")


# Fields of a vision tower that must agree for its weights to mean the same thing in another
# model; the rest (token_merge, feature_layer, use_head, pos_init, dtypes) are the new model's
# own choices.
TOWER_FIELDS = ("layout", "image_size", "patch_size", "num_channels", "width", "depth",
                "num_heads", "mlp_dim", "activation", "norm_eps", "tubelet")


def vision_tower(path: str, vision_config) -> dict:
    """``{"vision": weights}``: the vision tower of the model in ``path`` (any task's workdir
    or a converted checkpoint whose model has one) for a model whose tower is
    ``vision_config``, without a pooling head the new model does not have. A tower that
    differs in a field that changes its weights' meaning raises, naming the field."""
    ckpt = load(path)
    theirs = getattr(ckpt.model_config, "vision", None)
    if theirs is None:
        raise CheckpointError(f"vision_init={path}: the model has no vision tower")
    for field in TOWER_FIELDS:
        a, b = getattr(vision_config, field), getattr(theirs, field)
        if a != b:
            raise ConfigError(f"model.vision.{field}={a!r} but the vision tower in {path} "
                             f"has {b!r}")
    params = ckpt.params
    if "vision" not in params:
        raise CheckpointError(f"vision_init={path}: the model has no vision tower")
    tower = dict(params["vision"])
    if not vision_config.use_head:
        tower.pop("head", None)
    return {"vision": tower}
