"""Loading ``configs/*.py`` files and applying ``--config.key=value`` overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``. On the command
line it is named ``path/to/config.py[:arg]`` and its fields are overridden with
``--config.a.b=value``; the value is parsed as a Python literal and must fit the field's type,
and an unknown key is an error that names it (a typo never silently does nothing).

:func:`check_values` checks the values of a whole training config against one table,
:data:`VALUE_CHECKS` (key -> allowed range or choices), and refuses a non-finite float
anywhere; :func:`check_types` checks each value's type against the section defaults. Both run
before anything is built (:func:`medvl_jax.train.run.validate`).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import traceback
from typing import Any, Iterator, Mapping, Sequence

import ml_collections

from medvl_jax.cli_errors import UserError


class ConfigError(UserError):
    """A config file, key or value is wrong; the message names it and what is allowed."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``"configs/x.py:arg"`` → ``get_config("arg")`` of that file (``get_config()`` if no
    arg); an error in the file is a :class:`ConfigError` naming its line."""
    path, _, arg = spec.partition(":")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; expected a configs/<name>.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "medvl_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} defines no get_config(arg=None)")
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # The config file's own error: named with its line.
        raise ConfigError(_error_in_file(e, path)) from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, "
                          f"got {type(config).__name__}")
    return config


def _error_in_file(err: Exception, path: str) -> str:
    """``path:line: message`` of an exception raised while running the config file ``path``
    (the innermost line of that file in the traceback)."""
    line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
    for frame in traceback.extract_tb(err.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    kind = "" if type(err) is ValueError else f"{type(err).__name__}: "
    return f"{path}{f':{line}' if line else ''}: {kind}{text}"


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # A bare word is a string: --config.data.template=chatml


def _unknown_key(key: str, parent: ml_collections.ConfigDict, full: str) -> KeyError:
    close = difflib.get_close_matches(key, list(parent.keys()), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return KeyError(f"unknown config key {full!r}{hint}")


def apply_override(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Sets ``config.<dotted> = value``, checking that the key exists and the type fits.

    A model field the config file leaves out (``model.text.qk_norm``, say) exists too: the
    model dataclasses name the fields of ``model``, ``model.vision`` and ``model.text``.
    """
    *parents, last = dotted.split(".")
    node = config
    for i, key in enumerate(parents):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
            raise _unknown_key(key, node, ".".join(parents[:i + 1]))
        node = node[key]
    if last not in node:
        from medvl_jax.models import from_config

        if last not in from_config.model_fields(".".join(parents)):
            raise _unknown_key(last, node, dotted)
        node[last] = value  # A model field at its default so far: no type to check against.
        return
    old = node[last]
    if old is not None:
        value = _fit_type(old, value, f"--config.{dotted}={value!r}")
    if isinstance(node, ml_collections.ConfigDict):
        with node.ignore_type():
            node[last] = value
    else:
        node[last] = value


def _fit_type(old, value, where: str):
    """``value`` as the type of the field's current value ``old``: an int field takes an
    integral float (``1e4``), a float field an int, a tuple field a list; a ConfigError naming
    ``where`` otherwise (a float such as 2.5 for an int field, a string for a number, ...)."""
    def refuse():
        return ConfigError(f"{where}: expected a {type(old).__name__}")

    if value is None and not isinstance(old, bool):
        return value  # Unset; the value checks say whether the key may be unset.
    if isinstance(old, bool) or isinstance(value, bool):
        if isinstance(old, bool) != isinstance(value, bool):
            raise refuse()
        return value
    if isinstance(old, int):
        if isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{where}: expected an integer")
            return int(value)
        if not isinstance(value, int):
            raise refuse()
        return value
    if isinstance(old, float):
        if isinstance(value, str):  # "inf", "nan": floats, refused by the value checks.
            try:
                return float(value)
            except ValueError:
                raise refuse() from None
        if not isinstance(value, (int, float)):
            raise refuse()
        return float(value)
    if isinstance(old, str) and not isinstance(value, str):
        raise refuse()
    if isinstance(old, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise refuse()
        return tuple(value) if isinstance(old, tuple) else list(value)
    if isinstance(old, (dict, ml_collections.ConfigDict)) and not isinstance(
            value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"{where}: expected a dict")
    if isinstance(value, str) and not isinstance(old, str):
        raise refuse()
    return value


def parse_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, object]], list[str]]:
    """Splits ``--config.k=v`` arguments from the rest."""
    overrides, rest = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config."):
            key, eq, val = a[len("--config."):].partition("=")
            if not eq:
                val = next(it, None)
                if val is None:
                    raise ConfigError(f"{a} needs a value")
            overrides.append((key, _parse_value(val)))
        else:
            rest.append(a)
    return overrides, rest


def load_config(spec: str, overrides: Sequence[tuple[str, object]] = ()) -> \
        ml_collections.ConfigDict:
    """Loads a config file and applies overrides; the result is locked (no new keys). Before
    the overrides, a training config (one with a ``task``) is completed with what the file
    may leave out — its task section's defaults and the optional top-level keys
    (:func:`medvl_jax.tasks.complete_config`) — so that those can be overridden too."""
    config = load_config_file(spec)
    if "task" in config:
        from medvl_jax import tasks

        config = tasks.complete_config(config)
    for key, value in overrides:
        apply_override(config, key, value)
    config.lock()
    return config


# ---------------------------------------------------------------------------------------------
# Value checks of a whole training config (before anything is built)
# ---------------------------------------------------------------------------------------------

_INT32_MAX = 2**31 - 1  # Step counters and batch shapes are int32 on the device.
_FROM_MODEL = "None: set from the model"


@dataclasses.dataclass(frozen=True)
class Number:
    """A finite number (an int when ``integer``) with ``lo <= x <= hi``; ``lo_open`` /
    ``hi_open`` exclude that bound; ``also`` lists extra allowed values (e.g. -1 = "the
    rest", None = "taken from the model"); ``note`` says what they mean."""
    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()
    note: str = ""

    def allowed(self) -> str:
        parts = [f"{'>' if self.lo_open else '>='} {self.lo}"] if self.lo is not None else []
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi}")
        text = ("an integer" if self.integer else "a finite number") + (
            " " + " and ".join(parts) if parts else "")
        if self.also:
            text += ", or " + " or ".join(map(repr, self.also))
        return text + (f" ({self.note})" if self.note else "")

    def ok(self, x) -> bool:
        if any(x is a or (x == a and type(x) is type(a)) for a in self.also):
            return True
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        if (self.integer and not isinstance(x, int)) or not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return self.hi is None or not (x > self.hi or (self.hi_open and x == self.hi))


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of the listed values."""
    choices: tuple

    def allowed(self) -> str:
        return "one of " + ", ".join(map(repr, self.choices))

    def ok(self, x) -> bool:
        return x in self.choices


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two numbers, each with its own check (``names`` say what they are)."""
    first: Number
    second: Number
    names: tuple[str, str]

    def allowed(self) -> str:
        return (f"a pair ({self.names[0]}, {self.names[1]}) with {self.names[0]} "
                f"{self.first.allowed()} and {self.names[1]} {self.second.allowed()}")

    def ok(self, x) -> bool:
        return (isinstance(x, (tuple, list)) and len(x) == 2 and self.first.ok(x[0])
                and self.second.ok(x[1]))


@dataclasses.dataclass(frozen=True)
class Regex:
    """A string that compiles as a Python regular expression ('' = none)."""

    def allowed(self) -> str:
        return "a valid regular expression"

    def ok(self, x) -> bool:
        if not isinstance(x, str):
            return False
        try:
            re.compile(x)
        except re.error:
            return False
        return True


# Key (a dotted path; ``*`` stands for every entry of a user-named section) -> allowed values.
# Keys a config does not have are skipped. Every float anywhere in the config must be finite
# besides. ``optim.lr`` may be 0: a run that keeps its starting weights (an evaluation-only
# run, a check of loading or of throughput); freezing parameters is ``optim.freeze``.
# ``train.steps`` may be 0 for the same reason (the evaluators then see the starting weights).
VALUE_CHECKS: dict[str, Any] = {
    "optim.lr": Number(0, 1, note="0 keeps the starting weights"),
    "optim.schedule": OneOf(("cosine", "linear", "constant")),
    "optim.warmup_steps": Number(0, _INT32_MAX, integer=True),
    "optim.end_lr_fraction": Number(0, 1),
    "optim.b1": Number(0, 1, hi_open=True),
    "optim.b2": Number(0, 1, hi_open=True),
    "optim.eps": Number(0, 1, lo_open=True),
    "optim.weight_decay": Number(0),
    "optim.clip_norm": Number(0, note="0 disables clipping"),
    "optim.grad_accum": Number(1, _INT32_MAX, integer=True),
    "optim.freeze": Regex(),
    "optim.lr_groups.*": Number(0, note="a learning-rate multiplier"),
    "train.steps": Number(0, _INT32_MAX, integer=True, note="0 trains nothing"),
    "train.seed": Number(0, 2**32 - 1, integer=True),
    "train.log_every": Number(1, _INT32_MAX, integer=True),
    "train.checkpoint_every": Number(0, _INT32_MAX, integer=True,
                                     note="0 saves only on SIGTERM"),
    "train.keep_checkpoints": Number(1, integer=True),
    "train.max_nonfinite_in_a_row": Number(1, integer=True),
    "train.peak_flops_per_device": Number(0),
    "train.mesh.*": Number(1, integer=True, also=(-1,), note="-1: the remaining devices"),
    "data.batch_size": Number(1, _INT32_MAX, integer=True),
    "data.seed": Number(0, 2**32 - 1, integer=True),
    "data.max_length": Number(1, _INT32_MAX, integer=True, also=(None,), note=_FROM_MODEL),
    "data.image_size": Number(1, 2**16, integer=True, also=(None,), note=_FROM_MODEL),
    "data.channels": Number(1, integer=True),
    "data.max_images": Number(0, _INT32_MAX, integer=True),
    "data.num_image_tokens": Number(0, _INT32_MAX, integer=True, also=(None,),
                                    note=_FROM_MODEL),
    "data.qa_per_example": Number(1, integer=True),
    "data.num_threads": Number(0, integer=True),
    "data.prefetch": Number(0, integer=True),
    "data.truncation": OneOf(("error", "right")),
    "data.normalise": Pair(Number(), Number(0, lo_open=True), ("mean", "std")),
    "data.ct_window": Pair(Number(), Number(0, lo_open=True), ("centre", "width")),
    "data.sources.*.weight": Number(0),
    "data.nonfinite": OneOf(("error", "replace")),
    "data.max_skip_fraction": Number(0, 1),
    "lora.alpha": Number(0, lo_open=True),
    "model.attention_impl": OneOf((None, "auto", "xla", "splash", "cudnn")),
    "model.*.attention_impl": OneOf(("auto", "xla", "splash", "cudnn")),
}


def _entries(node, parts: list[str], prefix: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every entry of ``node`` at the path ``parts`` (``*``: each
    key)."""
    if not parts:
        yield prefix, node
        return
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)):
        return
    head, rest = parts[0], parts[1:]
    keys = list(node.keys()) if head == "*" else [head] if head in node else []
    for key in keys:
        yield from _entries(node[key], rest, f"{prefix}.{key}" if prefix else str(key))


def _floats(node, prefix: str) -> Iterator[tuple[str, float]]:
    """Every float of a nested config (in sections, lists and tuples) with its key."""
    if isinstance(node, (Mapping, ml_collections.ConfigDict)):
        for key in node.keys():
            yield from _floats(node[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for i, x in enumerate(node):
            yield from _floats(x, f"{prefix}[{i}]")
    elif isinstance(node, float):
        yield prefix, node


def check_values(config, checks: Mapping[str, Any] | None = None) -> None:
    """Raises :class:`ConfigError` naming the first key whose value ``checks`` (default
    :data:`VALUE_CHECKS`) refuses, or the first non-finite float anywhere in ``config``."""
    for key, value in _floats(config, ""):
        if not math.isfinite(value):
            raise ConfigError(f"config key {key}={value!r}: must be a finite number")
    for pattern, check in (VALUE_CHECKS if checks is None else checks).items():
        for key, value in _entries(config, pattern.split("."), ""):
            if not check.ok(value):
                raise ConfigError(f"config key {key}={value!r}: must be {check.allowed()}")


# Type of a default -> (types its value may have, what to call them). bool before int.
_KINDS = ((bool, (bool,), "a bool"), (int, (int,), "an integer"),
          (float, (int, float), "a number"), (str, (str,), "a string"),
          ((list, tuple), (list, tuple), "a list or tuple"),
          ((Mapping, ml_collections.ConfigDict), (Mapping, ml_collections.ConfigDict),
           "a section (dict)"))


def check_types(config, schema, *, prefix: str = "", open_keys: Sequence[str] = ()) -> None:
    """Raises :class:`ConfigError` naming the first value of ``config`` whose type does not fit
    its default in ``schema`` (a config of defaults): an int field holds an int (not 2.5, not
    True), a float field a number, a string field a string, a bool field a bool, a sequence a
    list or tuple, a section a dict. None defaults, defaults of other types, keys ``schema``
    lacks and the entries under ``open_keys`` are not checked."""
    for key in config.keys():
        full, value = f"{prefix}{key}", config[key]
        ref = schema[key] if key in schema else None
        kind = next(((ok, name) for types, ok, name in _KINDS if isinstance(ref, types)), None)
        if kind is None or value is None:
            continue
        ok, name = kind
        if not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok):
            raise ConfigError(f"config key {full}={value!r}: expected {name}, got "
                              f"{type(value).__name__}")
        if isinstance(ref, (Mapping, ml_collections.ConfigDict)) and full not in open_keys:
            check_types(value, ref, prefix=full + ".", open_keys=open_keys)
