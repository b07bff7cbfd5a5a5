"""The one training loop every task shares.

    mesh → data → model state (shape-first, sharded; or resumed) → jitted step
      → loop: step, metrics, checkpoints, evaluations → final evaluation

A task (see :mod:`medvl_jax.train.task`) gives the model and the loss; this module owns
everything else. Determinism: the step's RNG is ``fold_in(seed, step)`` and the data position
is saved with every checkpoint, so a resumed run continues bit-exactly (on CPU).
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvl_jax.data import pipeline
from medvl_jax.data.errors import SkipCounter
from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import metrics as metrics_lib
from medvl_jax.train import optim


def default_config() -> ml_collections.ConfigDict:
    """The ``train`` section of a config."""
    c = ml_collections.ConfigDict()
    c.steps = 1000
    c.seed = 0
    c.log_every = 10
    c.eval_every = 0              # 0: evaluate only at the end.
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.max_nonfinite_in_a_row = 5  # Abort after this many skipped (non-finite) steps in a row.
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.peak_flops_per_device = 0.0  # For the MFU estimate; 0 = not reported.
    c.progress = True
    return c


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree."""
    step: jnp.ndarray
    params: Any
    opt_state: Any
    nonfinite_total: jnp.ndarray
    nonfinite_streak: jnp.ndarray


class _Preempted:
    """Turns SIGTERM into a flag checked at step boundaries (TPU preemption notice)."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.flag = True
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # Not the main thread: no handler, no flag.
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _shardings(abstract, mesh):
    """NamedShardings for a boxed (logically partitioned) abstract pytree."""
    specs = nn.get_partition_spec(abstract)
    with mesh:
        return nn.logical_to_mesh_sharding(specs, mesh, mesh_lib.RULES)


def make_train_step(task, tx, lr_schedule, grad_accum: int):
    """The (unjitted) step: loss + grads over ``grad_accum`` microbatches, guarded update."""

    def loss_and_grad(params, batch, rng):
        (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, rng)
        return loss, aux, grads

    def step(state: TrainState, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state.step)
        if grad_accum == 1:
            loss, aux, grads = loss_and_grad(state.params, batch, rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, mb):
                i, acc = carry
                l, a, g = loss_and_grad(state.params, mb, jax.random.fold_in(rng, i))
                acc = jax.tree.map(jnp.add, acc, (l, a, g))
                return (i + 1, acc), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                loss_and_grad, state.params, jax.tree.map(lambda x: x[0], micro), rng))
            (_, (loss, aux, grads)), _ = jax.lax.scan(body, (0, zeros), micro)
            loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, (loss, aux, grads))
        gnorm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa
        new_state = TrainState(
            step=state.step + 1, params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        metrics = {"loss": loss, "grad_norm": gnorm, "learning_rate": lr_schedule(state.step),
                   **aux}
        return new_state, metrics

    return step


def train(config: ml_collections.ConfigDict, workdir: str, task, *, devices=None) -> dict:
    """Trains ``task`` as ``config`` says, in ``workdir`` (resuming from it if it holds a
    checkpoint). ``devices``: the mesh's devices (default: all). Returns the final evaluation
    results."""
    tc = config.train
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(dict(tc.mesh), devices)
    dp = mesh_lib.data_parallel_size(mesh)
    bs = config.data.batch_size
    if bs % dp:
        raise ValueError(f"data.batch_size={bs} is not divisible by the data-parallel size {dp} "
                         f"(mesh {dict(mesh.shape)})")
    if bs % config.optim.grad_accum:
        raise ValueError(f"data.batch_size={bs} is not divisible by optim.grad_accum="
                         f"{config.optim.grad_accum}")

    # --- data ------------------------------------------------------------------------------
    skips = SkipCounter()
    data_iter = pipeline.build_iterator(config.data, task.tokenizer, split="train",
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count(), skips=skips)

    # --- model state: shapes first, then shardings, then a sharded init ----------------------
    rng = jax.random.key(tc.seed)
    init_rng, step_rng = jax.random.split(rng)
    dummy = task.dummy_batch(bs // jax.process_count())
    boxed = jax.eval_shape(task.init, init_rng, dummy)
    param_shardings = _shardings(boxed, mesh)
    tx, lr_schedule = optim.make_optimizer(config.optim, nn.unbox(boxed), tc.steps)

    def init_state(r):
        params = nn.unbox(task.init(r, dummy))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), nonfinite_total=jnp.zeros((), jnp.int32),
                          nonfinite_streak=jnp.zeros((), jnp.int32))

    abstract_state = jax.eval_shape(init_state, init_rng)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Optimizer moments follow their parameters' shardings; scalars are replicated.
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: replicated)
    state_shardings = TrainState(step=replicated, params=param_shardings,
                                 opt_state=opt_shardings, nonfinite_total=replicated,
                                 nonfinite_streak=replicated)

    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                         keep=tc.keep_checkpoints)
    meta = ckpt_lib.metadata(config, task.name)
    latest = manager.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, state_shardings)
        state, saved_meta = manager.restore(latest, target, data_iter)
        ckpt_lib.check_compatible(saved_meta, meta)
        print(f"resumed from step {latest} in {workdir}")
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)

    # --- the jitted step -------------------------------------------------------------------
    batch_sharding = mesh_lib.batch_sharding(mesh)
    step_fn = jax.jit(make_train_step(task, tx, lr_schedule, config.optim.grad_accum),
                      in_shardings=(state_shardings, batch_sharding, replicated),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    def to_global(local):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local)

    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    flops = None
    start = int(state.step)
    progress = metrics_lib.Progress(start, tc.steps, enabled=tc.progress
                                    and jax.process_index() == 0)
    window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
    results: dict = {}
    with _Preempted() as preempted:
        for step in range(start, tc.steps):
            local = next(data_iter)
            batch = to_global(local)
            if flops is None:  # Compile once, and read the step's FLOPs off the compiled step.
                step_fn = step_fn.lower(state, batch, step_rng).compile()
                flops = metrics_lib.compiled_flops(step_fn)
            state, m = step_fn(state, batch, step_rng)
            window_steps += 1
            window_tokens += int(local["input_mask"].sum()) * jax.process_count()
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                m = jax.device_get(m)
                streak, total = int(state.nonfinite_streak), int(state.nonfinite_total)
                dt = time.perf_counter() - window_t
                row = {k: float(v) for k, v in m.items()}
                row.update(step=done, step_time=dt / window_steps,
                           examples_per_s=window_steps * bs / dt,
                           tokens_per_s=window_tokens / dt, skipped_nonfinite=total,
                           skipped_examples=skips.total)
                if flops and tc.peak_flops_per_device:
                    row["mfu"] = flops * window_steps / dt / (
                        tc.peak_flops_per_device * jax.device_count())
                writer.write(done, row)
                progress.update(done, row)
                window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
                if streak >= tc.max_nonfinite_in_a_row:
                    manager.wait()
                    raise FloatingPointError(
                        f"{streak} steps in a row had a non-finite loss or gradient (up to step "
                        f"{done}); stopping. The last good checkpoint is kept in {workdir}.")
            else:
                progress.update(done)
            if preempted.flag:
                manager.save(done, state, data_iter, meta, force=True)
                manager.wait()
                print(f"SIGTERM: saved step {done} in {workdir}; exiting")
                progress.close()
                return {"preempted_at": done}
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                manager.save(done, state, data_iter, meta)
            if tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
                results = task.evaluate(state.params, split="val")
                writer.write_eval(done, results)
    progress.close()
    manager.wait()
    if skips.total:
        print(f"skipped {skips.total} bad examples: {skips.counts}")
    results = task.evaluate(state.params, split="test") if hasattr(task, "evaluate") else {}
    if results:
        writer.write_eval(int(state.step), results)
    writer.close()
    return results
