"""Command line of the training loop: load and validate a config, build its task, train."""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import ml_collections

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.models import lora
from medvl_jax.tasks import classify, contrastive, dpo, grpo, pretrained, sft
from medvl_jax.train import loop, optim

# Task name (config.task) -> (task class, its config section name, that section's defaults).
TASKS = {"sft": (sft.SFTTask, "sft", sft.default_config),
         "dpo": (dpo.DPOTask, "dpo", dpo.default_config),
         "grpo": (grpo.GRPOTask, "grpo", grpo.default_config),
         "contrastive": (contrastive.ContrastiveTask, "contrastive", contrastive.default_config),
         "classify": (classify.ClassifyTask, "classify", classify.default_config)}

_TOP_LEVEL = {"task", "tokenizer", "data", "model", "optim", "train", "model_family", "lora",
              "init_from"}  # init_from: a converted checkpoint dir (medvl_jax.tasks.pretrained)


def validate(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on unknown keys (at the top level and inside the data,
    optim, train and task sections) or an unknown task."""
    if config.get("task") not in TASKS:
        raise ValueError(f"config.task must be one of {sorted(TASKS)}, got "
                         f"{config.get('task')!r}")
    _, section, defaults = TASKS[config.task]
    allowed = _TOP_LEVEL | {section}
    for key in config.keys():
        if key not in allowed:
            raise KeyError(f"unknown config key {key!r}; allowed at the top level: "
                           f"{sorted(allowed)}")
    for name, ref in (("data", pipeline.default_config()), ("optim", optim.default_config()),
                      ("train", loop.default_config()), ("lora", lora.default_config()),
                      (section, defaults())):
        if name in config:
            loop.validate_config(config[name], ref, prefix=name + ".")
    if "lora" in config:
        lora.check_config(config.lora)
    if "data" in config and config.data.get("pack") and config.task != "sft":
        raise ValueError(f"data.pack=True packs SFT examples; the {config.task!r} task builds "
                         f"its own batches and cannot pack")


def print_table(results: dict) -> None:
    """The per-question-type table of an evaluation."""
    if not results.get("per_type"):
        return
    print(f"\n{results['split']} set, {results['num_questions']} questions")
    print(f"{'question type':<18}{'n':>6}{'score':>9}")
    for qtype, row in results["per_type"].items():
        print(f"{qtype:<18}{row['n']:>6}{100 * row['score']:>8.1f}%")
    print(f"{'overall':<18}{results['num_questions']:>6}{100 * results['overall']:>8.1f}%")


def _has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint to resume from."""
    from medvl_jax.train import checkpoint as ckpt_lib

    path = os.path.join(workdir, "checkpoints")
    return os.path.isdir(path) and ckpt_lib.CheckpointManager(
        path, async_save=False).latest_step() is not None


def main(argv=None) -> int:
    """``python -m medvl_jax.train --config FILE[:ARG] --workdir DIR [--config.k=v ...]``:
    loads and validates the config, builds its task and trains; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    overrides, rest = config_lib.parse_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m medvl_jax.train",
                                description="Train a task from a config file.")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and results go here")
    args = p.parse_args(rest)
    # Before anything can touch a JAX backend (a config file may): a multi-process job (TPU
    # pod, SLURM step, launch/local.py) joins its peers here; a single process does nothing.
    from medvl_jax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    config = config_lib.load_config(args.config, overrides)
    validate(config)
    return train(config, args.workdir)


def make_tokenizer(config: ml_collections.ConfigDict):
    """The config's tokenizer, or None for a task without text (an empty ``tokenizer``)."""
    return pipeline.make_tokenizer(config.tokenizer) if config.get("tokenizer") else None


def _vision_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains ``sft.vision_stage`` (a config spec) into ``<workdir>/vision_stage`` (resuming
    it if a previous attempt stopped) and returns that directory, whose tower starts the SFT
    run. A resumed SFT run has its own weights and skips the stage."""
    spec = config.get("sft", {}).get("vision_stage") or ""
    if not spec or _has_checkpoint(workdir):
        return ""
    if config.sft.vision_init or config.get("init_from"):
        raise ValueError("sft.vision_stage trains the vision tower to start from; set it or "
                         "sft.vision_init / init_from, not both")
    stage = config_lib.load_config(spec)
    validate(stage)
    stage_dir = os.path.join(workdir, "vision_stage")
    print(f"vision stage: {spec} -> {stage_dir}")
    train(stage, stage_dir)
    print(f"vision stage done; training {config.task} on its tower")
    return stage_dir


def train(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Builds the task of a validated config and trains it in ``workdir`` (after its vision
    stage, if any); prints and writes the results; returns the exit code."""
    staged = _vision_stage(config, workdir)
    # init_from: model/tokenizer from the checkpoint (a VLM, or a two-tower model).
    starts = contrastive if config.task == "contrastive" else pretrained
    config = starts.resolve_config(config)
    tokenizer = make_tokenizer(config)
    init_from = config.get("init_from") or ""
    if init_from and starts is pretrained:
        pretrained.check_tokenizer(tokenizer, pretrained.checkpoint_config(init_from), init_from)
    task_cls = TASKS[config.task][0]
    task = task_cls(config, tokenizer)
    weights, fresh = None, None
    vision_init = staged or config.get("sft", {}).get("vision_init") or ""
    if vision_init and init_from:
        raise ValueError("set either init_from (a whole VLM) or sft.vision_init (its vision "
                         "tower), not both")
    if not _has_checkpoint(workdir):  # A resumed run has its own weights.
        if init_from:
            weights = starts.load_params(init_from, task)
            print(f"starting from {init_from}")
        elif vision_init:
            from medvl_jax.convert import workdir as workdir_lib

            weights = workdir_lib.vision_tower(vision_init, task.model_config.vision)
            fresh = "^(?!vision/)"  # Everything but the tower starts from its random init.
            print(f"vision tower from {vision_init}")
    results = loop.train(config, workdir, task, pretrained=weights, fresh=fresh)
    if jax.process_index() != 0:  # Every process evaluated (SPMD); the first one reports.
        return 0
    print_table(results)
    if hasattr(task, "report"):  # A task's own results table (contrastive, classify).
        task.report(results, workdir)
    if results.get("per_type"):
        path = os.path.join(workdir, "results.json")
        with open(path, "w") as f:
            json.dump({k: v for k, v in results.items() if k != "predictions"}, f, indent=1)
        print(f"results written to {path}")
    return 0
