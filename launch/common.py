"""What the launchers share: the ``launcher flags -- train args`` command line, the train
command, and printing/running shell commands."""
from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence

DEFAULT_MODULE = "medvl_jax.train"
# The trainer's exit status after a SIGTERM (medvl_jax.train.guards.PREEMPTED_EXIT_CODE; not
# imported, the launchers run without jax): the run saved (or kept its newest checkpoint) and
# wants to be started again.
PREEMPTED_EXIT_CODE = 75


def split_argv(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """``[launcher flags..., "--", train args...]`` → the two lists (the second may be
    empty when there is no ``--``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse(parser, argv: Sequence[str] | None):
    """``(launcher args, train args)`` of ``[launcher flags..., "--", train args...]``;
    exits with a usage error when nothing follows ``--``."""
    launcher_argv, train_args = split_argv(argv)
    args = parser.parse_args(launcher_argv)
    require_train_args(parser, train_args)
    return args, train_args


def require_train_args(parser, train_args: Sequence[str]) -> None:
    """Exits with a usage error when nothing follows ``--``."""
    if not train_args:
        parser.error("give the training command's arguments after '--', e.g. "
                     "-- --config configs/medsynth_sft.py --workdir /shared/run1")


def train_command(python: str, module: str, train_args: Sequence[str]) -> list[str]:
    """``[python, -m, module, *train_args]``."""
    return [python, "-m", module, *train_args]


def join(cmd: Sequence[str]) -> str:
    """A command as one shell line, quoted so that it can be pasted into a shell."""
    return shlex.join([str(c) for c in cmd])


def run(cmd: Sequence[str], *, dry_run: bool, check: bool = True) -> int:
    """Prints the command line; unless ``dry_run``, runs it (without a shell) and returns its
    exit code, raising CalledProcessError on failure when ``check``."""
    print(join(cmd), flush=True)
    if dry_run:
        return 0
    return subprocess.run(list(cmd), check=check).returncode
