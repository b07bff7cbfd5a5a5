"""Functional LoRA: low-rank factors beside a model's params, merged into the weights at apply.

Layout. With LoRA on, a task's params are ``{**base_params, "lora": lora_tree}``: base paths
are unchanged (pretrained weights load by path as before) and the factors of a targeted kernel
``a/b/c`` live at ``lora/a/b/c/{a,b}``. A kernel ``W`` of shape ``[*lead, *in, *out]`` (``lead``
is the stacked-layer axis of ``nn.scan``-ned layers, ``in``/``out`` the axes its einsum
contracts and produces, e.g. ``[heads, head_dim | embed]`` for an attention output) gets

    a: [*lead, *in, rank]      b: [*lead, rank, *out]

and the merged weight is ``W + scale * (a @ b)`` reshaped back to ``W``'s shape, with
``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``rslora``). The split is implied by the
shapes (``len(lead) = a.ndim + b.ndim - 2 - W.ndim``), so merging needs no side table. ``a``
starts random (Kaiming-uniform with ``bound = 1 / sqrt(fan_in)``, as PEFT does; or
``N(0, 1/rank)`` with ``init="gaussian"``), ``b`` starts at zero, so an initial LoRA model
computes exactly what the base model computes. Factors carry logical axis names (those of the
kernel's lead/in/out axes; the rank axis is unnamed, i.e. replicated).

Which axes are inputs: from the kernel's logical names when the params are boxed (a kernel
whose first non-layer axis is a heads axis -- ``heads``, ``kv_heads``, ``vision_heads`` -- has
two input axes ``[heads, head_dim]``; every other kernel has one), else from the path (a path
segment named exactly ``layers`` means a stacked layer axis; a kernel named ``o`` has two
input axes).

Training merges at apply time (:func:`merge` inside the jitted step): memory for optimizer
state is only the factors', but the forward pass computes with full merged weights, so the
backward pass still computes each target's full weight gradient (from which the factors'
gradients follow). With a low-precision ``param_dtype`` the merged weight is formed in the
factors' dtype (float32 by default); the model then casts it to its compute dtype, which can
round away very small updates that PEFT's separate low-rank path would keep.

Dropout. PEFT drops elements of the input ``x`` of the low-rank path
(``dropout(x) @ A @ B``), independently per token; a merged weight cannot express a per-token
mask. Here ``dropout`` drops *input features* instead: each row of ``a`` (one input feature of
one kernel, one layer) is zeroed with probability ``dropout`` and the rest scaled by
``1 / (1 - dropout)``, one mask per step shared by every token of the batch. Per feature this
has PEFT's expectation, but the noise is correlated across tokens and examples, so it is a
weaker, different regulariser; treat ``dropout`` values tuned for PEFT as a starting point
only. Evaluation and export never drop.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

LORA_KEY = "lora"
# optim.freeze used when LoRA is on and optim.freeze is empty: everything but the factors.
FREEZE_BASE = r"^(?!lora/)"
HEAD_AXES = ("heads", "kv_heads", "vision_heads")
_INITS = ("kaiming_uniform", "gaussian")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_config() -> ml_collections.ConfigDict:
    """The ``lora`` section of a config (``rank=0``: LoRA off)."""
    c = ml_collections.ConfigDict()
    c.rank = 0                   # 0 = off.
    c.alpha = 16.0               # scale = alpha / rank (alpha / sqrt(rank) with rslora).
    c.rslora = False
    c.dropout = 0.0              # Input-feature dropout on the low-rank path (module docstring).
    c.targets = ""               # Regex on "a/b/c" param paths, e.g. r"^decoder/.*/attn/(q|v)$".
    c.init = "kaiming_uniform"   # kaiming_uniform (PEFT's default) | gaussian (std 1/rank).
    c.dtype = "float32"          # Dtype of the factors.
    return c


def get_config(config: Mapping | None) -> ml_collections.ConfigDict:
    """The checked LoRA config of a whole run config (its ``lora`` section, else LoRA off),
    or of a ``lora`` section itself. Raises naming the bad key or value."""
    out = default_config()
    if config is None:
        return out
    if "rank" in config:  # A lora section itself.
        section = config
    else:
        section = config[LORA_KEY] if LORA_KEY in config else None
    if section is None:
        return out
    if not hasattr(section, "keys"):
        raise TypeError(f"config.lora must be a section, got {type(section).__name__}")
    for key in section.keys():
        if key not in out:
            raise KeyError(f"unknown config key 'lora.{key}'; valid: {sorted(out.keys())}")
        with out.ignore_type():
            out[key] = section[key]
    check_config(out)
    return out


def check_config(c: Mapping) -> None:
    """Raises ValueError naming the first invalid field of a ``lora`` section."""
    if int(c["rank"]) != c["rank"] or c["rank"] < 0:
        raise ValueError(f"lora.rank must be an integer >= 0, got {c['rank']!r}")
    if not 0.0 <= float(c["dropout"]) < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {c['dropout']!r}")
    if c["init"] not in _INITS:
        raise ValueError(f"lora.init must be one of {_INITS}, got {c['init']!r}")
    if c["dtype"] not in _DTYPES:
        raise ValueError(f"lora.dtype must be one of {sorted(_DTYPES)}, got {c['dtype']!r}")
    if c["rank"] > 0:
        if not c["targets"]:
            raise ValueError("lora.rank > 0 but lora.targets is empty; give a regex on param "
                             "paths, e.g. r'^decoder/.*/attn/(q|k|v|o)$'")
        try:
            re.compile(c["targets"])
        except re.error as e:
            raise ValueError(f"lora.targets={c['targets']!r} is not a valid regex: {e}") from e


def enabled(c: Mapping | None) -> bool:
    """Whether a ``lora`` section turns LoRA on."""
    return c is not None and int(c["rank"]) > 0


def scale(c: Mapping) -> float:
    """The factor multiplying ``a @ b``."""
    r = int(c["rank"])
    return float(c["alpha"]) / (math.sqrt(r) if c["rslora"] else r)


# ---------------------------------------------------------------------------------------------
# Paths and layouts
# ---------------------------------------------------------------------------------------------

def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _flat(tree) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` keeping flax boxes as leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
    return {_path_str(p): x for p, x in leaves}


def _unflat(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return tree


def kernel_layout(path: str, shape: tuple[int, ...],
                  names: tuple[str | None, ...] | None = None) -> tuple[int, int]:
    """``(n_lead, n_in)``: how many leading stacked-layer axes and input axes the kernel at
    ``path`` has (from its logical ``names`` when known, else from its path; see the module
    docstring). Raises ValueError when no input/output split exists."""
    if names is not None:
        n_lead = 0
        while n_lead < len(names) and names[n_lead] == "layers":
            n_lead += 1
        first = names[n_lead] if n_lead < len(names) else None
        n_in = 2 if first in HEAD_AXES else 1
    else:
        n_lead = 1 if "layers" in path.split("/") else 0
        n_in = 2 if path.split("/")[-1] == "o" and len(shape) - n_lead == 3 else 1
    if len(shape) - n_lead - n_in < 1:
        raise ValueError(f"LoRA target {path!r} with shape {tuple(shape)} is not a kernel "
                         f"(it needs input and output axes; biases, norms and scalars cannot "
                         f"carry a LoRA)")
    return n_lead, n_in


def targets_of(params: Any, c: Mapping) -> list[str]:
    """The param paths that ``c.targets`` selects (sorted); ValueError naming the regex when
    it matches nothing. The ``lora`` entry itself is never a target."""
    rx = re.compile(c["targets"])
    found = sorted(p for p in _flat(params)
                   if not p.startswith(LORA_KEY + "/") and rx.search(p))
    if not found:
        raise ValueError(f"lora.targets={c['targets']!r} matches no parameter of the model")
    return found


# ---------------------------------------------------------------------------------------------
# Init, merge, split
# ---------------------------------------------------------------------------------------------

def init_lora(rng, params_or_shapes: Any, config: Mapping) -> dict:
    """The factor tree ``{target path: {"a", "b"}}`` (nested) for ``params_or_shapes`` (arrays
    or ShapeDtypeStructs, boxed or not). ``a`` is random, ``b`` zero. When the base params are
    boxed (``nn.LogicallyPartitioned``) the factors are boxed with matching logical names."""
    check_config(config)
    if not enabled(config):
        raise ValueError("init_lora needs lora.rank > 0")
    r = int(config["rank"])
    dtype = _DTYPES[config["dtype"]]
    flat = _flat(params_or_shapes)
    out = {}
    for k, path in enumerate(targets_of(params_or_shapes, config)):
        leaf = flat[path]
        boxed = _is_box(leaf)
        value = leaf.value if boxed else leaf
        names = tuple(leaf.names) if boxed and hasattr(leaf, "names") else None
        shape = tuple(value.shape)
        n_lead, n_in = kernel_layout(path, shape, names)
        lead, ins, outs = (shape[:n_lead], shape[n_lead:n_lead + n_in],
                           shape[n_lead + n_in:])
        fan_in = math.prod(ins)
        key = jax.random.fold_in(rng, k)
        a_shape = lead + ins + (r,)
        if config["init"] == "gaussian":
            a = jax.random.normal(key, a_shape, dtype) / r
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        b = jnp.zeros(lead + (r,) + outs, dtype)
        if boxed:
            nm = names or (None,) * len(shape)
            a = nn.LogicallyPartitioned(a, nm[:n_lead + n_in] + (None,))
            b = nn.LogicallyPartitioned(b, nm[:n_lead] + (None,) + nm[n_lead + n_in:])
        out[path + "/a"] = a
        out[path + "/b"] = b
    return _unflat(out)


def split(params: Mapping) -> tuple[dict, dict | None]:
    """``(base params, lora tree or None)``."""
    base = {k: v for k, v in params.items() if k != LORA_KEY}
    return base, params.get(LORA_KEY)


def factors(lora_tree: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{target path: (a, b)}`` of a factor tree; ValueError naming an incomplete entry."""
    flat = _flat(lora_tree)
    out = {}
    for key in flat:
        path, _, leaf = key.rpartition("/")
        if leaf not in ("a", "b"):
            raise ValueError(f"unexpected entry lora/{key} (factors end in /a or /b)")
        if path in out:
            continue
        if path + "/a" not in flat or path + "/b" not in flat:
            raise ValueError(f"lora/{path} lacks its a or b factor")
        out[path] = (nn.unbox(flat[path + "/a"]), nn.unbox(flat[path + "/b"]))
    return out


def delta(w_shape: tuple[int, ...], a, b, s: float):
    """``s * a @ b`` reshaped to ``w_shape`` (float32 or the factors' wider dtype)."""
    n_lead = a.ndim + b.ndim - 2 - len(w_shape)
    r = a.shape[-1]
    if n_lead < 0 or b.shape[n_lead] != r or a.shape[:n_lead] != b.shape[:n_lead]:
        raise ValueError(f"factors {a.shape} x {b.shape} do not fit a kernel {w_shape}")
    lead = tuple(w_shape[:n_lead])
    a2 = a.reshape(lead + (-1, r))
    b2 = b.reshape(lead + (r, -1))
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    if d.size != math.prod(w_shape):
        raise ValueError(f"factors {a.shape} x {b.shape} do not fit a kernel {w_shape}")
    return (d * s).reshape(w_shape)


def merge(params_with_lora: Mapping, config: Mapping, rng=None,
          deterministic: bool = True) -> dict:
    """The base params with ``W + scale * a @ b`` on every factored kernel and no ``lora``
    entry (pure; jittable). With ``dropout > 0``, ``rng`` given and not ``deterministic``,
    rows of ``a`` (input features) are dropped as the module docstring says. Params without
    a ``lora`` entry are returned as they are."""
    base, tree = split(params_with_lora)
    if tree is None:
        return base
    s = scale(config)
    p = float(config["dropout"])
    drop = p > 0 and rng is not None and not deterministic
    flat = _flat(base)
    for k, (path, (a, b)) in enumerate(sorted(factors(tree).items())):
        if path not in flat:
            raise ValueError(f"lora/{path} has no base parameter {path!r}")
        w = flat[path]
        boxed = _is_box(w)
        wv = w.value if boxed else w
        if drop:
            n_in_total = a.ndim - 1  # lead + in axes
            keep = jax.random.bernoulli(jax.random.fold_in(rng, k), 1.0 - p,
                                        a.shape[:n_in_total] + (1,))
            a = jnp.where(keep, a / (1.0 - p), jnp.zeros_like(a))
        d = delta(tuple(wv.shape), a, b, s)
        merged = wv + d.astype(jnp.result_type(wv.dtype, a.dtype))
        flat[path] = w.replace_boxed(merged) if boxed else merged
    return _unflat(flat)


def merged_params(params: Mapping, config: Mapping) -> dict:
    """Merged params for export/evaluation: like :func:`merge` (no dropout) but every merged
    kernel keeps its base dtype. Host (numpy) or device arrays; returns the same kind."""
    base, tree = split(params)
    if tree is None:
        return base
    merged = merge(params, config)
    flat_m, flat_b = _flat(merged), _flat(base)
    for path in factors(tree):
        w = flat_b[path]
        wv = nn.unbox(w)
        m = nn.unbox(flat_m[path])
        m = np.asarray(m).astype(np.asarray(wv).dtype) if isinstance(wv, np.ndarray) \
            else m.astype(wv.dtype)
        flat_m[path] = w.replace_boxed(m) if _is_box(w) else m
    return _unflat(flat_m)
