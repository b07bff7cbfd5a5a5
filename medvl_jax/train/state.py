"""The train state and its shape-first, sharded initialisation.

    jax.eval_shape(init)  ->  shardings from the logical-axis rules
        ->  pretrained weights placed straight into their shardings (optional)
        ->  jax.jit(init of the rest, out_shardings=...)  ->  jax.jit(tx.init, ...)

Nothing is ever materialised unsharded, and a pretrained model is never held twice: the
jitted init returns only the parameters the checkpoint does not provide, so XLA never
computes (or allocates) the random init of the loaded ones.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from medvl_jax.parallel import rules as rules_lib


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    ``nonfinite_*`` count the steps whose update was skipped because the loss or a gradient
    was not finite: in total, in the current run of consecutive skips, and the longest run.
    """
    step: jnp.ndarray
    params: Any
    opt_state: Any
    nonfinite_total: jnp.ndarray
    nonfinite_streak: jnp.ndarray
    nonfinite_worst_streak: jnp.ndarray


def new_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A step-0 state for ``params`` (plain arrays, not boxed)."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_total=zero,
                      nonfinite_streak=zero, nonfinite_worst_streak=zero)


def path_str(path) -> str:
    """A pytree key path as ``"a/b/c"``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for a nested dict/pytree."""
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_shardings(abstract_state: TrainState, param_shardings: Any, tx, mesh: Mesh) -> TrainState:
    """Shardings for every leaf of the state: optimizer moments follow their parameters,
    counters and scalars are replicated."""
    replicated = rules_lib.replicated(mesh)
    # Frozen or grouped params (optax.multi_transform) leave MaskedNodes in the inner states.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s,
                                abstract_state.opt_state, param_shardings,
                                transform_non_params=lambda _: replicated, is_leaf=masked)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                      nonfinite_total=replicated, nonfinite_streak=replicated,
                      nonfinite_worst_streak=replicated)


def abstract_params(init_fn: Callable, rng, batch) -> tuple[Any, Any]:
    """``(boxed, unboxed)`` shape-only parameters of ``init_fn(rng, batch)``."""
    boxed = jax.eval_shape(init_fn, rng, batch)
    return boxed, nn.unbox(boxed)


def abstract_state(init_fn: Callable, tx, mesh: Mesh, rng, batch) -> tuple[TrainState, TrainState]:
    """``(shape-only state with shardings attached, the state's shardings)``: the target to
    restore a checkpoint onto ``mesh``."""
    boxed, params = abstract_params(init_fn, rng, batch)
    p_sh = rules_lib.logical_shardings(boxed, mesh)
    shapes = jax.eval_shape(lambda p: new_state(p, tx), params)
    shardings = state_shardings(shapes, p_sh, tx, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
    return target, shardings


def check_pretrained(model: Mapping[str, Any], given: Mapping[str, Any],
                     fresh: str | None) -> None:
    """Strict merge check: raises ValueError naming every unexpected key (in ``given`` but not
    in the model), missing key (in the model, not given and not matched by the ``fresh``
    regex) and mis-shaped key."""
    fresh_rx = re.compile(fresh) if fresh else None
    unexpected = sorted(set(given) - set(model))
    missing = sorted(k for k in model if k not in given
                     and not (fresh_rx is not None and fresh_rx.search(k)))
    misshaped = sorted(f"{k}: checkpoint {tuple(np.shape(given[k]))}, model "
                       f"{tuple(model[k].shape)}" for k in given
                       if k in model and tuple(np.shape(given[k])) != tuple(model[k].shape))
    problems = []
    for what, keys in (("unexpected (not in the model)", unexpected),
                       ("missing (neither loaded nor matched by fresh="
                        f"{fresh!r})", missing), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20
                                            else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise ValueError("pretrained parameters do not fit the model; " + "; ".join(problems))


def _place(value: Any, aval: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.Array:
    """One host array onto its sharding, each device reading only its own slice."""
    host = np.asarray(value)
    if host.dtype != aval.dtype:
        host = host.astype(aval.dtype)
    return jax.make_array_from_callback(aval.shape, sharding, lambda idx: host[idx])


def init_params(init_fn: Callable, mesh: Mesh, rng, batch, *,
                pretrained: Mapping[str, Any] | None = None,
                fresh: str | None = None) -> tuple[Any, Any]:
    """Sharded parameters and their shardings.

    ``pretrained``: weights to load, as a nested dict or a flat ``{"a/b/c": array}`` dict
    (host or device arrays; cast to the model's dtypes). They are placed into their shardings
    first; then only the remaining parameters are initialised, and those must be exactly the
    ones matched by the ``fresh`` regex (see :func:`check_pretrained`).
    """
    boxed, params_shape = abstract_params(init_fn, rng, batch)
    shardings = rules_lib.logical_shardings(boxed, mesh)
    leaves_shape, treedef = jax.tree_util.tree_flatten_with_path(params_shape)
    keys = [path_str(p) for p, _ in leaves_shape]
    avals = [a for _, a in leaves_shape]
    sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))

    given: dict[str, Any] = {}
    if pretrained is not None:
        nested = any(isinstance(v, Mapping) for v in pretrained.values())
        given = flatten(pretrained) if nested else dict(pretrained)
        check_pretrained(dict(zip(keys, avals)), given, fresh)

    loaded = {i: _place(given[k], avals[i], sh_leaves[i]) for i, k in enumerate(keys)
              if k in given}
    rest = [i for i in range(len(keys)) if i not in loaded]

    def init_rest(r):
        leaves = jax.tree.leaves(nn.unbox(init_fn(r, batch)))
        return [leaves[i] for i in rest]

    with rules_lib.activation_rules(mesh):
        fresh_leaves = jax.jit(init_rest, out_shardings=[sh_leaves[i] for i in rest])(rng)
    out = [None] * len(keys)
    for i, x in loaded.items():
        out[i] = x
    for i, x in zip(rest, fresh_leaves):
        out[i] = x
    return jax.tree_util.tree_unflatten(treedef, out), shardings


def init_state(init_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh, rng, batch, *,
               pretrained: Mapping[str, Any] | None = None,
               fresh: str | None = None) -> tuple[TrainState, TrainState]:
    """A sharded step-0 :class:`TrainState` and its shardings (see :func:`init_params`)."""
    params, p_sh = init_params(init_fn, mesh, rng, batch, pretrained=pretrained, fresh=fresh)
    shapes = jax.eval_shape(lambda p: new_state(p, tx), params)
    shardings = state_shardings(shapes, p_sh, tx, mesh)
    # Donated: the state's params are the given buffers, not a copy.
    state = jax.jit(lambda p: new_state(p, tx), out_shardings=shardings,
                    donate_argnums=0)(params)
    return state, shardings
