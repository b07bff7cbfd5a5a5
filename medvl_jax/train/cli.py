"""Command line of the training loop: load and validate a config, build its task, train.

A mistake in the command line, the config or the data (an unknown key, a value of the wrong
type or out of range, a missing file, a workdir that is a file, a bad record) is reported as
one ``error:`` line on stderr with exit code 2, before anything is built where it can be
(:mod:`medvl_jax.cli_errors`); ``--verbose`` adds the traceback.
"""
from __future__ import annotations

import argparse
import os

from medvl_jax import cli_errors
from medvl_jax import config as config_lib
from medvl_jax.train import run


@cli_errors.handle_errors
def main(argv=None) -> int:
    """``python -m medvl_jax.train --config FILE[:ARG] --workdir DIR [--config.k=v ...]
    [--verbose]``: loads and validates the config, builds its task and trains; returns the
    exit code."""
    with cli_errors.user_input():
        overrides, rest = config_lib.parse_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m medvl_jax.train",
                                description="Train a task from a config file.")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and results go here")
    cli_errors.add_verbose_flag(p)
    args = p.parse_args(rest)
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise NotADirectoryError(f"--workdir {args.workdir} exists and is not a directory")
    # Before anything can touch a JAX backend (a config file may): a multi-process job (TPU
    # pod, SLURM step, launch/local.py) joins its peers here; a single process does nothing.
    from medvl_jax.parallel.mesh import maybe_initialize_distributed
    maybe_initialize_distributed()
    with cli_errors.user_input():
        config = run.load(args.config, overrides)
    return run.train(config, args.workdir)
