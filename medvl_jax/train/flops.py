"""FLOPs of a function, counted from its jaxpr: the matmuls and convolutions it performs.

XLA's ``cost_analysis()`` counts the body of a ``while``/``scan`` once, so a model with
``scan_layers`` (or a step with gradient accumulation) is undercounted by the trip count. Here
the jaxpr is walked instead: ``dot_general`` costs ``2 x batch x M x N x K``, a convolution
``2 x output elements x (input features per group x kernel window)``, and a ``scan`` body is
counted ``length`` times. Elementwise work is left out (it is a few percent of a transformer
step), as the usual "6 x parameters x tokens" count leaves it out.

The train FLOPs of a step, as used for MFU, are those of ``value_and_grad`` of the loss with
rematerialisation turned off (recomputation is not useful work): forward plus backward, where
frozen parameters (behind ``stop_gradient``) cost no weight gradient.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

def _dot_flops(eqn) -> float:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    m = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    n = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return 2.0 * math.prod(lhs[d] for d in lb) * m * n * math.prod(lhs[d] for d in lc)


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
    window = math.prod(rhs[d] for d in spec[2:])
    in_features = rhs[spec[1]]
    return 2.0 * math.prod(out) * in_features * window


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        if isinstance(v, jex_core.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jex_core.Jaxpr):
            yield v
        elif isinstance(v, (tuple, list)):
            for x in v:
                if isinstance(x, jex_core.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, jex_core.Jaxpr):
                    yield x


def jaxpr_flops(jaxpr, *, while_trips: int = 1) -> float:
    """Matmul and convolution FLOPs of a jaxpr; ``scan`` bodies times their length, ``cond``
    the most expensive branch, ``while`` bodies ``while_trips`` times (their trip count is
    not in the program)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr,
                                                       while_trips=while_trips)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr, while_trips=while_trips)
                         for b in eqn.params["branches"])
        elif name == "while":
            total += while_trips * jaxpr_flops(eqn.params["body_jaxpr"].jaxpr,
                                               while_trips=while_trips)
            total += (while_trips + 1) * jaxpr_flops(eqn.params["cond_jaxpr"].jaxpr,
                                                     while_trips=while_trips)
        else:
            total += sum(jaxpr_flops(j, while_trips=while_trips) for j in _sub_jaxprs(eqn))
    return total


def count(fn: Callable, *args: Any, while_trips: int = 1, **kwargs: Any) -> float:
    """Matmul and convolution FLOPs of one call ``fn(*args, **kwargs)``; arguments may be
    ``jax.ShapeDtypeStruct`` (nothing is computed)."""
    closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    return jaxpr_flops(closed.jaxpr, while_trips=while_trips)


def train_flops(loss_fn: Callable, params: Any, batch: Any, rng: Any) -> float:
    """FLOPs of ``value_and_grad(loss_fn)(params, batch, rng)`` (``loss_fn`` returns
    ``(loss, aux)``): a train step's work without the optimizer's elementwise update."""
    grad = jax.value_and_grad(loss_fn, has_aux=True)
    return count(grad, params, batch, rng)
