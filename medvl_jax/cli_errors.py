"""How the command lines report errors: one line for the user's mistakes, a traceback for bugs.

A *user error* is bad input that the person at the command line can fix:

* a config key, type or value (:class:`UserError` and its subclasses, e.g.
  :class:`medvl_jax.config.ConfigError`; and any ``KeyError`` / ``ValueError`` / ``TypeError``
  raised inside a :func:`user_input` block, the code that only checks input);
* a missing, unreadable or misplaced file or directory (``FileNotFoundError``,
  ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``, ``FileExistsError``);
* a corrupt, unsupported or wrong-shaped checkpoint (``convert.checkpoint_io.CheckpointError``,
  ``convert.mapping.ConversionError``, both :class:`UserError`);
* a bad data record or image (:class:`medvl_jax.data.errors.DataError`), too many of them
  (``TooManyBadRecords``) or a pipeline that gives nothing (``DataStall``).

A CLI's ``main`` decorated with :func:`handle_errors` prints such an error as one
``error: <message>`` line on stderr and returns exit code 2 (what argparse returns for a bad
flag); ``--verbose`` prints the traceback before that line. Any other exception is treated as
a bug and propagates with its full traceback (exit code 1 from the interpreter).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from typing import Callable, Sequence

from medvl_jax.data.errors import DataError, DataStall, TooManyBadRecords

USER_ERROR_EXIT = 2
VERBOSE_FLAG = "--verbose"


class UserError(ValueError):
    """Bad input the user can fix; the message names the key, file or record and the fault."""


# OS errors about a path the user named.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                FileExistsError)
USER_ERRORS = (UserError, DataError, TooManyBadRecords, DataStall) + _PATH_ERRORS


def message(err: BaseException) -> str:
    """The error's text on one line: without the quotes ``str(KeyError)`` adds, an OS error as
    ``<path>: <reason>``, several lines joined with "; "."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
        if err.filename2 is not None:
            text += f" (and {err.filename2})"
    elif isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


@contextlib.contextmanager
def user_input():
    """A block that only checks the user's input (loading and validating a config, checking
    flags): a ``KeyError``, ``ValueError`` or ``TypeError`` raised in it becomes a
    :class:`UserError` with the same message (the original is its ``__cause__``)."""
    try:
        yield
    except USER_ERRORS:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(message(e)) from e


def add_verbose_flag(parser) -> None:
    """Adds ``--verbose`` (read by :func:`handle_errors`) to an argparse parser."""
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="on an error, print the full traceback, not only its message")


def handle_errors(main: Callable[[Sequence[str]], int]) -> Callable[..., int]:
    """Decorates a CLI's ``main(argv) -> int``: ``argv`` defaults to ``sys.argv[1:]``; a user
    error (see the module docstring) is printed as one line on stderr and gives exit code 2
    (after its traceback when ``--verbose`` is among the arguments); other exceptions
    propagate. The undecorated function is ``__wrapped__``."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return main(argv)
        except USER_ERRORS as e:
            if VERBOSE_FLAG in argv:
                traceback.print_exc()
            print(f"error: {message(e)}", file=sys.stderr)
            return USER_ERROR_EXIT

    return run
