"""A training run from a config: check it, build its task and evaluators, start, train, report.

    config ─ complete (task defaults merged) ─ validate ─ [vision stage] ─ open init_from
           ─ task.resolve_config ─ task ─ evaluators ─ starting weights ─ loop.train ─ report

Nothing here knows a task by name: the task's class (``config.task``, see
:mod:`medvl_jax.tasks`) gives its config section, its defaults and how it starts from a
checkpoint; ``config.evals`` gives the evaluators (:mod:`medvl_jax.evaluate.evaluators`).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections

from medvl_jax import config as config_lib
from medvl_jax import tasks
from medvl_jax.data import pipeline
from medvl_jax.models import lora
from medvl_jax.train import guards, loop, optim, restore

# Top-level keys besides the task's own section.
TOP_LEVEL = {
    "task": "the task's name (a module of medvl_jax.tasks, or a dotted module path)",
    "tokenizer": "a tokenizer name or directory ('' for a task without text)",
    "data": "the data section (medvl_jax.data.pipeline.default_config)",
    "model": "the model section (the task's model config fields)",
    "optim": "the optimizer section (medvl_jax.train.optim.default_config)",
    "train": "the loop's section (medvl_jax.train.loop.default_config)",
    "lora": "LoRA (medvl_jax.models.lora.default_config); absent: off",
    "evals": "evaluators by name (medvl_jax.evaluate.evaluators)",
    "init_from": "a training workdir or converted checkpoint to start the whole model from",
    "vision_init": "a training workdir or converted checkpoint to start the vision tower from",
    "vision_stage": "a config ('path.py[:arg]') trained first into <workdir>/vision_stage, "
                    "whose tower then starts this run",
    "model_family": "saved in checkpoint metadata",
}


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the task's section completed from its defaults and the optional
    top-level keys present (:func:`medvl_jax.tasks.complete_config`)."""
    return tasks.complete_config(config)


def validate(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on an unknown task (listing the known ones), unknown keys
    at the top level and inside the data, optim, train, lora and task sections, values of the
    wrong type in those sections (:func:`medvl_jax.config.check_types`), values out of range
    or not finite (:func:`medvl_jax.config.check_values`), and malformed evaluator entries."""
    from medvl_jax.evaluate import evaluators

    task = tasks.get(config.get("task"))
    section = tasks.section(config.task)
    allowed = set(TOP_LEVEL) | {section}
    for key in config.keys():
        if key not in allowed:
            raise KeyError(f"unknown config key {key!r}; allowed at the top level: "
                           f"{sorted(allowed)}")
    open_keys = loop.OPEN_KEYS + tuple(f"{section}.{k}" for k in task.open_keys)
    for name, ref in (("data", pipeline.default_config()), ("optim", optim.default_config()),
                      ("train", loop.default_config()), ("lora", lora.default_config()),
                      (section, task.default_config())):
        if name in config:
            loop.validate_config(config[name], ref, prefix=name + ".", open_keys=open_keys)
            config_lib.check_types(config[name], ref, prefix=name + ".", open_keys=open_keys)
    config_lib.check_values(config)
    if "lora" in config:
        lora.check_config(config.lora)
    for name, e in dict(config.get("evals") or {}).items():
        evaluators.check_entry(f"evals.{name}", e.to_dict() if hasattr(e, "to_dict") else e)
    if config.get("init_from") and (config.get("vision_init") or config.get("vision_stage")):
        raise ValueError("init_from starts the whole model; vision_init / vision_stage start "
                         "its vision tower: set one of them")
    if config.get("vision_init") and config.get("vision_stage"):
        raise ValueError("vision_stage trains the tower that starts this run; set it or "
                         "vision_init, not both")


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """A config file (``path.py[:arg]``) with ``--config.k=v`` overrides, completed and
    validated."""
    config = config_lib.load_config(spec, overrides)  # Completed before the overrides.
    validate(config)
    return config


def build(config: ml_collections.ConfigDict):
    """``(config, task, start)``: ``init_from`` opened (a workdir or a converted checkpoint;
    its weights are read later, when needed), the config completed from it by the task, and
    the task built."""
    init_from = config.get("init_from") or ""
    start = restore.load(init_from) if init_from else None
    task_cls = tasks.get(config.task)
    config = task_cls.resolve_config(config, start)
    tokenizer = pipeline.make_tokenizer(config.tokenizer) if config.get("tokenizer") else None
    return config, task_cls(config, tokenizer, start=start), start


def _vision_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains ``config.vision_stage`` (a config spec) into ``<workdir>/vision_stage``
    (resuming it if a previous attempt stopped) and returns that directory, whose tower starts
    the run. A resumed run has its own weights and skips the stage."""
    spec = config.get("vision_stage") or ""
    if not spec or restore.latest_step(workdir) is not None:
        return ""
    stage_dir = os.path.join(workdir, "vision_stage")
    print(f"vision stage: {spec} -> {stage_dir}")
    train(load(spec), stage_dir)
    print(f"vision stage done; training {config.task} on its tower")
    return stage_dir


def train(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Builds the task of a validated config and trains it in ``workdir`` (after its vision
    stage, if any); prints the evaluators' tables and writes ``<workdir>/results.json``;
    returns the exit code."""
    from medvl_jax.evaluate import evaluators

    staged = _vision_stage(config, workdir)
    config, task, start = build(config)
    evals = evaluators.build(config, task)
    weights, fresh = None, None
    vision_init = staged or config.get("vision_init") or ""
    if restore.latest_step(workdir) is None:  # A resumed run has its own weights.
        if start is not None:
            weights = task.pretrained_params()
            print(f"starting from {start.path}")
        elif vision_init:
            vision = getattr(task.model_config, "vision", None)
            if vision is None:
                raise ValueError(f"vision_init: task {task.name!r}'s model has no vision tower")
            weights = restore.vision_tower(vision_init, vision)
            fresh = "^(?!vision/)"  # Everything but the tower starts from its random init.
            print(f"vision tower from {vision_init}")
    results = loop.train(config, workdir, task, evaluators=evals, pretrained=weights,
                         fresh=fresh)
    if "preempted_at" in results:  # Launchers requeue on this status.
        return guards.PREEMPTED_EXIT_CODE
    if jax.process_index() != 0:
        return 0  # Every process evaluated (SPMD); the first one reports.
    for name, res in results.items():
        print(evals[name].format(res))
    if results:
        path = os.path.join(workdir, "results.json")
        with open(path, "w") as f:
            json.dump({name: {k: v for k, v in res.items() if k != "predictions"}
                       for name, res in results.items()}, f, indent=1)
        print(f"results written to {path}")
    return 0
