"""Declarative parameter mappings between Hugging Face state dicts and medvl_jax param trees.

A family's mapping is data: a list of :class:`Rule` (HF tensor name template -> our param path
template + a :class:`Transform`). The engine applies it both ways.

Templates use ``{i}`` for a layer index. On our side the segment ``<name>/{i}`` stands for
either ``<name>_{i}`` (unscanned layers) or ``<name>`` with the layer as leading axis
(``nn.scan``-ned layers); the engine stacks or unstacks accordingly, so one rule list serves
both layouts.
"""
from __future__ import annotations

import dataclasses
from collections import abc
import math
import re
from typing import Any, Iterable, Iterator

import numpy as np

from medvl_jax.cli_errors import UserError


class ConversionError(UserError):
    """A checkpoint does not fit the target model: lists missing, unexpected, mis-shaped keys."""

    def __init__(self, *, missing=(), unexpected=(), misshaped=(), where: str = ""):
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.misshaped = list(misshaped)
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {self.missing[:20]}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {self.unexpected[:20]}")
        if self.misshaped:
            parts.append(f"mis-shaped {len(self.misshaped)}: {self.misshaped[:20]}")
        super().__init__(f"{where}: " * bool(where) + "; ".join(parts))


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one tensor changes between the HF layout and ours.

    kind:
      "copy": same values, reshaped to our shape (and flattened back to ``hf_ndim`` dims).
      "dense": torch Linear weight ``[out, in]`` <-> our kernel whose first ``n_in`` axes are
        the input (``[in..., out...]``): transpose, then reshape.
      "conv": torch conv weight ``[out, in, *k]`` <-> ours ``[*k, in, out]``.
    """

    kind: str = "copy"
    n_in: int = 1
    hf_ndim: int = 1

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Converts an HF tensor to our layout with target ``shape`` (raises ValueError)."""
        if self.kind == "copy":
            return _reshape(x, shape)
        if self.kind == "dense":
            if x.ndim != 2:
                raise ValueError(f"expected a 2-D Linear weight, got shape {x.shape}")
            return _reshape(x.T, shape)
        if self.kind == "conv":
            perm = tuple(range(2, x.ndim)) + (1, 0)
            return _reshape(np.transpose(x, perm), shape)
        raise ValueError(f"unknown transform {self.kind!r}")

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Converts our tensor back to the HF layout."""
        if self.kind == "copy":
            if self.hf_ndim == 1:
                return np.ascontiguousarray(x.reshape(-1))
            return np.ascontiguousarray(x)
        if self.kind == "dense":
            n_in = math.prod(x.shape[: self.n_in])
            return np.ascontiguousarray(x.reshape(n_in, -1).T)
        if self.kind == "conv":
            nk = x.ndim - 2
            perm = (nk + 1, nk) + tuple(range(nk))
            return np.ascontiguousarray(np.transpose(x, perm))
        raise ValueError(f"unknown transform {self.kind!r}")


def _reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.size != math.prod(shape):
        raise ValueError(f"cannot fit shape {tuple(x.shape)} into {tuple(shape)}")
    return x.reshape(shape)


COPY = Transform("copy")
COPY_ND = Transform("copy", hf_ndim=0)  # keep our ndim on export (e.g. position tables)
DENSE = Transform("dense", n_in=1)
DENSE_OUT = Transform("dense", n_in=2)  # e.g. attention output [heads, head_dim, embed]
CONV = Transform("conv")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Maps HF tensor ``hf`` to our param ``ours`` (``/``-separated), through ``transform``."""

    hf: str
    ours: str
    transform: Transform = COPY


@dataclasses.dataclass(frozen=True)
class Mapping:
    """A family's rules plus HF names (regexes) ignored on import (tied heads, buffers)."""

    rules: tuple[Rule, ...]
    ignore_hf: tuple[str, ...] = ()


def _hf_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _our_path(template: str, i: int | None, scanned: bool) -> tuple[str, bool]:
    """Concrete path of a template; returns (path, stacked) with stacked = scanned layer axis."""
    if "{i}" not in template:
        return template, False
    if scanned:
        return template.replace("/{i}", ""), True
    return template.replace("/{i}", f"_{i}"), False


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, abc.Mapping):
            out.update(flatten(dict(v), key))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """``{"a/b/c": leaf}`` -> nested dict."""
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def hf_to_ours(
    tensors: Iterable[tuple[str, np.ndarray]], mapping: Mapping, target: dict, *,
    scanned: bool, where: str = "",
) -> dict:
    """Builds our param tree from HF ``(name, array)`` pairs, streamed one at a time.

    ``target`` is our (unboxed) param tree of shapes/dtypes, e.g. from ``jax.eval_shape``.
    Scanned params are filled layer by layer into one preallocated array, so nothing is held
    twice. Raises :class:`ConversionError` naming every missing, unexpected or mis-shaped key.
    """
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in flatten(target).items()}
    compiled = [(_hf_regex(r.hf), r) for r in mapping.rules]
    ignores = [re.compile(p) for p in mapping.ignore_hf]
    out: dict[str, np.ndarray] = {}
    filled: dict[str, set[int]] = {}
    unexpected, misshaped = [], []
    for name, arr in tensors:
        match = next(((m, r) for rx, r in compiled if (m := rx.match(name))), None)
        if match is None:
            if not any(p.search(name) for p in ignores):
                unexpected.append(name)
            continue
        m, rule = match
        i = int(m.group("i")) if "i" in m.groupdict() else None
        path, stacked = _our_path(rule.ours, i, scanned)
        if path not in shapes:
            unexpected.append(f"{name} (-> {path}, no such param)")
            continue
        shape, dtype = shapes[path]
        want = shape[1:] if stacked else shape
        if stacked and not 0 <= i < shape[0]:
            unexpected.append(f"{name} (layer {i} >= {shape[0]})")
            continue
        try:
            value = rule.transform.to_ours(np.asarray(arr), want)
        except ValueError as err:
            misshaped.append(f"{name} {tuple(np.shape(arr))} -> {path} {want}: {err}")
            continue
        if stacked:
            if path not in out:
                out[path] = np.empty(shape, dtype)
            out[path][i] = value
            filled.setdefault(path, set()).add(i)
        else:
            out[path] = np.array(value, dtype=dtype)  # off the memory map
    missing = [p for p in shapes if p not in out]
    for path, idx in filled.items():
        lacking = sorted(set(range(shapes[path][0][0])) - idx)
        if lacking:
            missing.append(f"{path} layers {lacking}")
    if missing or unexpected or misshaped:
        raise ConversionError(missing=missing, unexpected=unexpected, misshaped=misshaped,
                              where=where)
    return unflatten(out)


def ours_to_hf(params: dict, mapping: Mapping, *, scanned: bool,
               dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields HF ``(name, array)`` pairs from our params, one tensor at a time.

    Leaves must be readable from this process (numpy, or jax arrays that are fully
    addressable: gather them first on multi-host meshes).

    Raises :class:`ConversionError` if a param of ours has no rule.
    """
    flat = flatten(params)
    rules = []
    for r in mapping.rules:
        path, stacked = _our_path(r.ours, 0, scanned)
        if "{i}" in r.ours and not scanned:
            rx = re.compile("^" + re.escape(r.ours).replace(r"/\{i\}", r"_(?P<i>\d+)") + "$")
        else:
            rx = re.compile("^" + re.escape(path) + "$")
        rules.append((rx, stacked, r))
    unmatched = [p for p in flat if not any(rx.match(p) for rx, _, _ in rules)]
    if unmatched:
        raise ConversionError(unexpected=unmatched, where="export (params without a rule)")

    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if dtype is not None else x

    for rx, stacked, rule in rules:
        for path, value in flat.items():
            m = rx.match(path)
            if not m:
                continue
            if stacked:
                for i in range(value.shape[0]):
                    yield rule.hf.format(i=i), rule.transform.to_hf(cast(value[i]))
            else:
                i = int(m.group("i")) if "i" in m.groupdict() else None
                yield rule.hf.format(i=i), rule.transform.to_hf(cast(value))
