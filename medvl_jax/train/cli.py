"""Command line of the training loop: load and validate a config, build its task, train."""
from __future__ import annotations

import argparse
import sys

from medvl_jax import config as config_lib
from medvl_jax.train import run


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
    return run.train(run.load(args.config, overrides), args.workdir)
