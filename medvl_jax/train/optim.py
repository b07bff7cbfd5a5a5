"""Optimizers from config: AdamW, warmup + cosine/linear/constant, clipping, freezing, groups.

Order of operations on the gradients: frozen parameters' gradients are zeroed (the train step
does not even compute them: loop.make_train_step puts frozen parameters behind a
stop_gradient), the rest are clipped by their global norm, then each group's AdamW (its own
learning-rate multiplier) updates its parameters. Frozen parameters get no optimizer state and
stay bit-identical. Weight decay is decoupled (AdamW) and only applies to matrices and higher
(ndim > 1), so norm scales and biases are never decayed.

Gradient accumulation (``grad_accum = k``) is not an optimizer wrapper: the train step splits
its batch into k equal microbatches and scans over them (loop.make_train_step), so one step
is one optimizer update and the schedule counts updates.
"""
from __future__ import annotations

import re

import jax
import ml_collections
import optax

from medvl_jax.train import state as state_lib


def default_config() -> ml_collections.ConfigDict:
    """The ``optim`` section of a config."""
    c = ml_collections.ConfigDict()
    c.lr = 1e-3
    c.schedule = "cosine"        # cosine | linear | constant (after warmup)
    c.warmup_steps = 100
    c.end_lr_fraction = 0.0      # Final lr as a fraction of lr (cosine/linear).
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0         # Decoupled; not applied to vectors (norms, biases).
    c.clip_norm = 1.0            # Global-norm clipping; 0 disables.
    c.grad_accum = 1             # Microbatches per step (the batch is split, scanned in-step).
    c.freeze = ""                # Regex on "a/b/c" param paths: frozen (no update, no state).
    c.lr_groups = {}             # {regex: lr multiplier}; first match wins.
    return c


def schedule(c, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``c.lr`` then the chosen decay until ``total_steps``."""
    decay_steps = max(total_steps - c.warmup_steps, 1)
    end = c.lr * c.end_lr_fraction
    if c.schedule == "cosine":
        after = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.end_lr_fraction)
    elif c.schedule == "linear":
        after = optax.linear_schedule(c.lr, end, decay_steps)
    elif c.schedule == "constant":
        after = optax.constant_schedule(c.lr)
    else:
        raise ValueError(f"optim.schedule must be cosine, linear or constant, got {c.schedule!r}")
    if c.warmup_steps <= 0:
        return after
    warm = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
    return optax.join_schedules([warm, after], [c.warmup_steps])


path_str = state_lib.path_str


def param_labels(params, c) -> dict:
    """Per-parameter label: "frozen", or the lr group ("g0", "g1", ... / "default")."""
    freeze = re.compile(c.freeze) if c.freeze else None
    groups = [(re.compile(p), f"g{i}") for i, p in enumerate(dict(c.lr_groups))]

    def label(path, _):
        name = path_str(path)
        if freeze is not None and freeze.search(name):
            return "frozen"
        for rx, g in groups:
            if rx.search(name):
                return g
        return "default"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(c, params, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for ``params`` and its base learning-rate schedule."""
    base = schedule(c, total_steps)

    def adamw(mult: float):
        lr = (lambda s: base(s) * mult) if mult != 1.0 else base
        decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
        return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                           mask=decay_mask)

    transforms = {"default": adamw(1.0), "frozen": optax.set_to_zero()}
    for i, (_, mult) in enumerate(dict(c.lr_groups).items()):
        transforms[f"g{i}"] = adamw(float(mult))
    labels = param_labels(params, c)
    used = set(jax.tree.leaves(labels))
    if c.freeze and "frozen" not in used:
        raise ValueError(f"optim.freeze={c.freeze!r} matches no parameter")
    # A group pattern must name some parameter (a typo fails); one whose parameters are all
    # frozen (a LoRA run of a config with groups) or taken by an earlier pattern is fine.
    names = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for i, pattern in enumerate(dict(c.lr_groups)):
        if f"g{i}" not in used and not any(re.search(pattern, n) for n in names):
            raise ValueError(f"optim.lr_groups pattern {pattern!r} matches no parameter")
    # Frozen gradients are zeroed before clipping, so they do not count in the global norm.
    zero_frozen = optax.multi_transform(
        {k: optax.set_to_zero() if k == "frozen" else optax.identity() for k in transforms},
        labels)
    clip = optax.clip_by_global_norm(c.clip_norm) if c.clip_norm else optax.identity()
    return optax.chain(zero_frozen, clip, optax.multi_transform(transforms, labels)), base
