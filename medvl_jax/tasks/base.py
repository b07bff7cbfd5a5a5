"""The one interface between a task and the rest: the loop, the CLIs, evaluators, exporters.

A task owns its model, its loss and its config section; the shared loop
(:mod:`medvl_jax.train.loop`) owns mesh, data iteration, state, optimizer, checkpoints,
metrics and guards. A task is a subclass of :class:`Task` in its own module
``medvl_jax/tasks/<name>.py`` that names it ``TASK`` (see :mod:`medvl_jax.tasks`); nothing
else in the package knows the task by name.

Required (abstract here)::

    name                                      config.task and the module's name
    dummy_batch(batch_size) -> dict           zeros shaped like a real local batch
    init(rng, batch) -> params                may carry flax logical-axis boxes
    loss(params, batch, rng) -> (loss, metrics)

Everything else has a working default, so the loop and the CLIs call it unconditionally.
``init`` is only ever called under ``jax.eval_shape`` or ``jax.jit``; ``loss`` is traced in the
jitted step, ``rng`` is ``fold_in(seed, step)`` (folded again per microbatch). The loss must be
a mean over the batch's examples, so that the mean over equal microbatches equals the loss of
the whole batch; a loss normalised by something the whole batch alone knows (a token count)
reads it from :meth:`Task.global_stats`.

What a model can produce for evaluators (:mod:`medvl_jax.evaluate.evaluators`) is declared in
``outputs``; each name is a method below that the task overrides::

    "text"             generate_texts(model_params, examples, ...)   vqa, report
    "image_embeddings" image_embeddings(model_params, images)        zero_shot, retrieval
    "text_embeddings"  text_embeddings(model_params, texts)          zero_shot, retrieval
    "label_logits"     label_logits(model_params, images), labels    classify
    "image_features"   image_features(model_params, images)          linear_probe

Evaluators receive *model params* (:meth:`Task.model_params`: LoRA merged, the plain
parameters of ``task.model``), never the train state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections
import numpy as np

Batch = Mapping[str, Any]
OUTPUTS = ("text", "image_embeddings", "text_embeddings", "label_logits", "image_features")


class Task:
    """Base class of every task; see the module docstring.

    Args:
      config: the whole run config (validated, defaults merged).
      tokenizer: the config's tokenizer, or None for a task without text.
      start: the checkpoint the run starts from (``config.init_from``), as
        :func:`medvl_jax.train.restore.load` gives it (its ``params`` are read lazily), or None.
    """

    name: str = ""
    outputs: frozenset = frozenset()  # What the model produces for evaluators (OUTPUTS).
    model_config: Any = None          # The model's dataclass config (export, vision_init).
    open_keys: tuple = ()             # Entries of the task's section whose keys users name.
    updates_per_batch: int = 1        # Optimizer steps on each prepared batch (GRPO's mu).
    flops_per_example: float | None = None  # Training FLOPs of one example (MFU); None:
                                            # XLA's count of the compiled step.

    def __init__(self, config: ml_collections.ConfigDict, tokenizer=None, *, start=None):
        self.config = config
        self.tokenizer = tokenizer
        self.start = start
        data = config.get("data") or {}
        if data.get("pack") and type(self).data_iterator is not Task.data_iterator:
            raise ValueError(f"data.pack=True packs the examples of the conversation pipeline; "
                             f"the {self.name!r} task builds its own batches and cannot pack")

    # --- config ---------------------------------------------------------------------------

    @staticmethod
    def default_config() -> ml_collections.ConfigDict:
        """The task's config section (``config[task.name]``) with its defaults; a config may
        give part of it, the rest is filled in (:func:`medvl_jax.tasks.complete_config`)."""
        return ml_collections.ConfigDict()

    @classmethod
    def resolve_config(cls, config: ml_collections.ConfigDict,
                       start) -> ml_collections.ConfigDict:
        """``config`` completed from the starting checkpoint ``start`` (an empty model section
        becomes the checkpoint's, an empty tokenizer its tokenizer...). Called before the task
        is built, with ``start`` None when there is no ``init_from``. Default: a task that
        cannot start from a checkpoint refuses one."""
        if start is not None:
            raise ValueError(f"task {cls.name!r} cannot start from a checkpoint; remove "
                             f"config.init_from (={start.path})")
        return config

    # --- the model ------------------------------------------------------------------------

    def dummy_batch(self, batch_size: int) -> dict:
        """Zeros shaped like a real batch of ``batch_size`` examples (shape-only init)."""
        raise NotImplementedError(f"{type(self).__name__}.dummy_batch")

    def init(self, rng, batch: Batch) -> Any:
        """Parameters for a batch of this shape (boxed with logical axes where named)."""
        raise NotImplementedError(f"{type(self).__name__}.init")

    def loss(self, params, batch: Batch, rng) -> tuple[Any, dict]:
        """``(scalar loss, {name: scalar metric})`` of one (micro)batch."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def model_params(self, params):
        """The plain parameters of the task's model (LoRA merged), for evaluation, sampling
        and export. Default: ``params`` as they are."""
        return params

    def pretrained_params(self) -> Any:
        """The starting checkpoint's parameters for this task's model, checked against it
        (a ValueError names the first field that differs). Called on a fresh run with
        ``init_from``; the loop places them before initialising the rest."""
        if self.start is None:
            raise ValueError("no starting checkpoint (config.init_from is empty)")
        check_same_model(self.model_config, self.start.model_config, self.start.path)
        return self.start.params

    def reference_params(self, params):
        """Plain params of the frozen model a run compares itself against (the starting
        model of a preference or RL run), or None. Evaluators with ``compare_start`` answer
        with these too."""
        del params
        return None

    # --- data -----------------------------------------------------------------------------

    def data_iterator(self, config, *, process_index: int, process_count: int, skips=None):
        """This process's grain iterator of training data; bad examples skipped (with
        ``data.skip_bad_examples``) are counted in ``skips`` (a SkipCounter). Default: the
        conversation pipeline of ``config.data`` (:mod:`medvl_jax.data.pipeline`)."""
        from medvl_jax.data import pipeline

        return pipeline.build_iterator(config.data, self.tokenizer, split="train", skips=skips,
                                       process_index=process_index,
                                       process_count=process_count)

    def prepare_batch(self, params, local_data, rng) -> dict:
        """Host-side, outside the jit: turns what the iterator gave into the step's batch with
        the current params (GRPO: rollouts). Called every ``updates_per_batch`` steps.
        Default: the data as it is."""
        del params, rng
        return local_data

    def rollout_plan(self) -> dict | None:
        """For a task that samples its batches from the current params (GRPO), what the
        planner (:mod:`medvl_jax.plan`) compiles besides the step: ``{"max_new_tokens": n,
        "prompt": one prompt row (tokens, input_mask, mask_ar, images), "reference_on_device":
        whether a frozen reference copy of the params stays on the devices}``. Default: None
        (nothing sampled)."""
        return None

    def global_stats(self, batch: Batch) -> dict:
        """Scalars of the whole global batch, computed in the step before it is split into
        microbatches and added to every microbatch the loss sees (``optim.grad_accum``).
        Default: none."""
        del batch
        return {}

    def count_tokens(self, local_batch: Batch) -> int:
        """Tokens in a local batch (for tokens/s): the sum of ``input_mask``, else 0."""
        if "input_mask" in local_batch:
            return int(np.asarray(local_batch["input_mask"]).sum())
        return 0

    def host_metrics(self) -> dict:
        """Host-side measurements since the last call, logged with each metrics row."""
        return {}

    # --- what the model produces, for evaluators ------------------------------------------

    def generate_texts(self, model_params, examples: list[dict], *, batch_size: int,
                       max_new_tokens: int, temperature: float = 0.0, rng=None) -> list[str]:
        """Answers to the final question of each example (``"text"`` in ``outputs``)."""
        raise NotImplementedError(f"task {self.name!r} does not generate text")

    def image_embeddings(self, model_params, images: np.ndarray) -> np.ndarray:
        """Normalised image embeddings ``[N, E]`` (``"image_embeddings"``)."""
        raise NotImplementedError(f"task {self.name!r} has no image embeddings")

    def text_embeddings(self, model_params, texts: list[str]) -> np.ndarray:
        """Normalised text embeddings ``[N, E]`` (``"text_embeddings"``)."""
        raise NotImplementedError(f"task {self.name!r} has no text embeddings")

    @property
    def labels(self) -> tuple[str, ...]:
        """Names of :meth:`label_logits`' outputs, in order (``"label_logits"``)."""
        return ()

    def label_logits(self, model_params, images: np.ndarray) -> np.ndarray:
        """Label logits ``[N, K]`` of preprocessed images (``"label_logits"``)."""
        raise NotImplementedError(f"task {self.name!r} has no label logits")

    def image_features(self, model_params, images: np.ndarray) -> np.ndarray:
        """Features ``[N, F]`` of preprocessed images for a linear probe
        (``"image_features"``)."""
        raise NotImplementedError(f"task {self.name!r} has no image features")

    def eval_image_config(self) -> ml_collections.ConfigDict:
        """The data section images are preprocessed with for evaluation (image size, channels,
        volumes). Default: ``config.data``."""
        return self.config.data


def from_start(config: ml_collections.ConfigDict, start, model_section: dict,
               what: str) -> ml_collections.ConfigDict:
    """The common part of a task's ``resolve_config``: without ``start`` a config with an
    empty model section is refused (``what``: the checkpoints that would fill it); with it,
    an unlocked copy whose ``init_from`` is the start's path, whose empty model section is
    ``model_section`` and whose empty tokenizer is the start's."""
    if start is None:
        if "model" in config and not config.model:
            raise ValueError(f"config.model is empty and config.init_from is not set: pass "
                             f"--config.init_from=DIR ({what}, see docs/finetune.md) or give "
                             f"a model section")
        return config
    out = ml_collections.ConfigDict(config.to_dict())
    out.init_from = start.path
    if not config.get("model"):
        out.model = ml_collections.ConfigDict(model_section)
    if not config.get("tokenizer"):
        if not start.tokenizer:
            raise ValueError(f"init_from={start.path} has no tokenizer; set config.tokenizer")
        out.tokenizer = start.tokenizer
    return out


def run_keys(seed: int):
    """``(init key, step key)`` of a run with ``train.seed = seed``: the loop initialises the
    parameters with the first (so a task can recompute a run's initial weights) and folds the
    step number into the second."""
    import jax

    init, step = jax.random.split(jax.random.key(int(seed)))
    return init, step


# Fields that change how a model computes, not which weights it has: never compared.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl")


def first_difference(ours: Any, theirs: Any, prefix: str = "model.") -> tuple | None:
    """``(dotted field, ours, theirs)`` of the first weights-relevant field where two model
    dataclass configs differ, or None."""
    if type(ours) is not type(theirs):
        return prefix.rstrip("."), type(ours).__name__, type(theirs).__name__
    for f in dataclasses.fields(ours):
        if f.name in RUNTIME_FIELDS:
            continue
        a, b = getattr(ours, f.name), getattr(theirs, f.name)
        if dataclasses.is_dataclass(a):
            diff = first_difference(a, b, f"{prefix}{f.name}.")
            if diff:
                return diff
        elif a != b:
            return f"{prefix}{f.name}", a, b
    return None


def check_same_model(ours: Any, theirs: Any, path: str) -> None:
    """Raises ValueError naming the first field where the run's model config differs from the
    starting checkpoint's."""
    diff = first_difference(ours, theirs)
    if diff:
        field, a, b = diff
        raise ValueError(f"{field}={a!r} in the config but {b!r} in init_from={path}; leave "
                         f"config.model empty to take the checkpoint's model, or make the "
                         f"section match it")
