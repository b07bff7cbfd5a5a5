"""Loading ``configs/*.py`` files and applying ``--config.key=value`` overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``. On the command
line it is named ``path/to/config.py[:arg]`` and its fields are overridden with
``--config.a.b=value``; the value is parsed as a Python literal and must fit the field's type,
and an unknown key is an error that names it (a typo never silently does nothing).
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``"configs/x.py:arg"`` → ``get_config("arg")`` of that file (``get_config()`` if no arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "medvl_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg=None)")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"{path}: get_config must return an ml_collections.ConfigDict")
    return config


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
    if isinstance(value, str) and not isinstance(old, str) and old is not None:
        raise ValueError(f"--config.{dotted}={value!r}: expected a {type(old).__name__}")
    if isinstance(old, bool) != isinstance(value, bool) and old is not None:
        raise ValueError(f"--config.{dotted}={value!r}: expected a {type(old).__name__}")
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(node, ml_collections.ConfigDict):
        with node.ignore_type():
            node[last] = value
    else:
        node[last] = value


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
                    raise ValueError(f"{a} needs a value")
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
