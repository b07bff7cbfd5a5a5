"""The one training loop every task shares.

    config checks → mesh → data → state (shape-first, sharded; or resumed) → jitted step
      → loop: step, metrics, checkpoints, evaluations, guards → final evaluation

A task (a :class:`medvl_jax.tasks.base.Task`) gives the model, the loss and its data; this
module owns everything else, and calls the task's members unconditionally (the base class
gives each optional one a working default). Evaluators (built from ``config.evals`` by
:mod:`medvl_jax.evaluate.evaluators`) are handed in and run every ``every`` steps and at the
end. Determinism: the step's RNG is ``fold_in(seed, step)`` and the data position
is saved with every checkpoint, so a resumed run continues bit-exactly (on CPU).

Guards (see also :mod:`medvl_jax.train.guards`):

* a step whose loss, gradient norm or update norm is not finite (an absurd learning rate
  overflows the latter before any weight does) applies no update (decided inside the
  jitted step, so nothing syncs for it) and is counted in the state; when ``train.max_nonfinite_in_a_row`` such steps follow each other the run
  stops with a FloatingPointError at the next log line;
* the state is therefore always finite; a checkpoint of it counts as *good* once the step
  after it is finite too. Rotation (``train.keep_checkpoints``) never deletes the
  newest good checkpoint, and a run stopped by non-finite steps moves the checkpoints newer
  than it aside (``<workdir>/checkpoints_nonfinite``), so a resume starts from it;
* with ``train.skip_loss_spikes = k`` a step whose loss exceeds k × the running median is not
  applied (counted in ``skipped_spikes``);
* bad records (``data.skip_bad_examples``) are counted per distinct record, saved with each
  checkpoint, printed at the end and on SIGTERM; past ``data.max_skip_fraction`` the run
  stops; no batch for ``train.data_timeout_s`` stops it too (DataStall);
* SIGTERM (a preemption notice) makes the loop save at the next step boundary and return
  ``{"preempted_at": step}`` (the CLI exits with guards.PREEMPTED_EXIT_CODE); if it comes
  while the pipeline is stalled, the loop returns without saving.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import time
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvl_jax.models import lora as lora_lib
from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.parallel import rules as rules_lib
from medvl_jax.config import ConfigError
from medvl_jax.data.errors import SkipCounter, TooManyBadRecords
from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import guards
from medvl_jax.train import metrics as metrics_lib
from medvl_jax.train import optim
from medvl_jax.tasks.base import Task, run_keys
from medvl_jax.train import state as state_lib

TrainState = state_lib.TrainState  # Re-exported for callers of the loop.

# Config paths whose entries are user-named (not checked against the defaults).
OPEN_KEYS = ("data.sources", "optim.lr_groups", "train.mesh")


def default_config() -> ml_collections.ConfigDict:
    """The ``train`` section of a config."""
    c = ml_collections.ConfigDict()
    c.steps = 1000
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 200      # Also saved at the end; 0: only on SIGTERM.
    c.keep_checkpoints = 2        # Plus the newest good one, if older (see the module doc).
    c.async_checkpoints = True
    c.max_nonfinite_in_a_row = 5  # Abort after this many skipped (non-finite) steps in a row.
    c.skip_loss_spikes = 0.0      # k > 0: skip steps with loss > k x running median.
    c.data_timeout_s = 600.0      # Stop when no batch comes for this long; 0 = wait forever.
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.peak_flops_per_device = 0.0  # For the MFU estimate; 0 = not reported.
    c.progress = True
    return c


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------

def validate_config(config: Mapping, schema: Mapping, *, prefix: str = "",
                    open_keys: tuple[str, ...] = OPEN_KEYS) -> None:
    """Raises KeyError naming the first key of ``config`` that ``schema`` (a config of
    defaults) does not have, with close matches as a hint. Sections are compared recursively,
    except the user-named entries under ``open_keys``."""
    for key in config.keys():
        full = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown config key {full!r}{hint}")
        sub, ref = config[key], schema[key]
        if hasattr(sub, "keys") and hasattr(ref, "keys") and full not in open_keys:
            validate_config(sub, ref, prefix=full + ".", open_keys=open_keys)


def optim_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.optim`` as the run uses it: with LoRA on (``config.lora.rank > 0``) and an
    empty ``optim.freeze``, everything but the ``lora/`` factors is frozen."""
    oc = config.optim
    if lora_lib.enabled(lora_lib.get_config(config)) and not oc.freeze:
        oc = ml_collections.ConfigDict(oc.to_dict())
        oc.freeze = lora_lib.FREEZE_BASE
    return oc


def _check_batch(batch_size: int, dp: int, grad_accum: int, mesh) -> None:
    if grad_accum < 1:
        raise ConfigError(f"optim.grad_accum must be >= 1, got {grad_accum}")
    if batch_size % dp:
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by the data-parallel "
                         f"size {dp} (mesh {dict(mesh.shape)})")
    if batch_size % (grad_accum * dp):
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by optim.grad_accum="
                         f"{grad_accum} x the data-parallel size {dp}")
    if batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def make_train_step(task, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    grad_accum: int, mesh=None, labels=None) -> Callable:
    """The (unjitted) step ``(state, batch, base_rng) -> (state, metrics)``.

    With ``grad_accum = k`` the batch is split into k equal microbatches, taken with stride k
    (rows i, i+k, ...) so that each one stays spread over all data-parallel devices; loss,
    metrics and gradients are averaged over a ``lax.scan``. The update is skipped (state kept,
    counters raised) when the loss, the gradient norm or the update's norm is not finite
    (so no parameter can become non-finite). With ``max_loss`` (a scalar; see
    guards.SpikeGuard) a step whose loss exceeds it is not applied either (metric
    ``loss_spike``; not a non-finite step).

    ``labels`` (:func:`optim.param_labels`): parameters labelled "frozen" are behind a
    ``stop_gradient``, so their weight gradients are never computed (a LoRA run does not pay
    for the base's) and ``grad_norm`` is the norm of the trainable gradients, the one clipped.
    """
    frozen = (None if labels is None or "frozen" not in jax.tree.leaves(labels)
              else jax.tree.map(lambda label: label == "frozen", labels))

    def loss_and_grad(params, batch, rng, stats):
        batch = {**batch, **stats}  # Whole-batch scalars (task.global_stats).
        def loss_fn(p):
            if frozen is not None:
                p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, frozen)
            return task.loss(p, batch, rng)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, aux, grads

    def split(x):
        m = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            spec = jax.sharding.PartitionSpec(None, ("data", "fsdp"))
            m = jax.lax.with_sharding_constraint(m, jax.sharding.NamedSharding(mesh, spec))
        return m

    def step(state: state_lib.TrainState, batch, base_rng, max_loss=None):
        rng = jax.random.fold_in(base_rng, state.step)
        stats = task.global_stats(batch)
        if grad_accum == 1:
            loss, aux, grads = loss_and_grad(state.params, batch, rng, stats)
        else:
            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                i, acc = carry
                out = loss_and_grad(state.params, mb, jax.random.fold_in(rng, i), stats)
                return (i + 1, jax.tree.map(jnp.add, acc, out)), None

            shapes = jax.eval_shape(loss_and_grad, state.params,
                                    jax.tree.map(lambda x: x[0], micro), rng, stats)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (_, total), _ = jax.lax.scan(body, (0, zeros), micro)
            loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, total)
        gnorm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A finite gradient can still make an update that overflows the weights (a huge
        # learning rate): the update's norm is checked too (one fused reduction, like the
        # gradient's; it is not finite for any update with an element above ~1.8e19).
        unorm = optax.global_norm(updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(unorm)
        apply = finite
        extra = {}
        if max_loss is not None:
            spike = finite & (loss > max_loss)
            apply = finite & ~spike
            extra["loss_spike"] = spike.astype(jnp.float32)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)

        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = state_lib.TrainState(
            step=state.step + 1, params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            nonfinite_streak=streak,
            nonfinite_worst_streak=jnp.maximum(state.nonfinite_worst_streak, streak))
        metrics = {"loss": loss, "grad_norm": gnorm, "learning_rate": lr_schedule(state.step),
                   **aux, **extra}
        return new_state, metrics

    return step


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What :func:`build_step` gives: the loop runs ``step``; ``python -m medvl_jax.plan``
    lowers and compiles the same ``step`` for a TPU topology.

    ``dummy``: zeros shaped like one example (what the parameters are initialised with:
    their shapes never depend on the batch size); ``batch_shape``: the global batch as
    ``jax.ShapeDtypeStruct`` with its sharding; ``target``: the shape-only state with its
    shardings attached (what a checkpoint is restored onto); ``step(state, batch, step_rng[,
    max_loss])``: jitted with explicit shardings and the state donated.
    """
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    params_shape: Any
    target: Any
    shardings: Any
    batch_sharding: Any
    dummy: dict
    batch_shape: dict
    step: Callable


def build_step(config: ml_collections.ConfigDict, task, mesh, *,
               spike_guard: bool = False) -> StepParts:
    """The optimizer, the state's shapes and shardings on ``mesh`` (nothing allocated) and the
    jitted train step, exactly as :func:`train` runs them. ``spike_guard``: the step takes
    the loss-spike threshold as a fourth argument (``train.skip_loss_spikes > 0``)."""
    tc, oc = config.train, optim_config(config)
    init_rng, _ = run_keys(tc.seed)
    dummy = task.dummy_batch(1)  # A pod's global batch of images would not fit the host.
    _, params_shape = state_lib.abstract_params(task.init, init_rng, dummy)
    tx, lr_schedule = optim.make_optimizer(oc, params_shape, tc.steps)
    target, shardings = state_lib.abstract_state(task.init, tx, mesh, init_rng, dummy)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    batch_shape = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((int(config.data.batch_size),) + np.shape(x)[1:],
                                       np.asarray(x).dtype, sharding=batch_sharding), dummy)
    replicated = rules_lib.replicated(mesh)
    step = jax.jit(
        make_train_step(task, tx, lr_schedule, int(config.optim.grad_accum), mesh,
                        labels=optim.param_labels(params_shape, oc)),
        in_shardings=(shardings, batch_sharding, replicated) + (
            (replicated,) if spike_guard else ()),
        out_shardings=(shardings, replicated), donate_argnums=(0,))
    return StepParts(tx=tx, lr_schedule=lr_schedule, params_shape=params_shape, target=target,
                     shardings=shardings, batch_sharding=batch_sharding, dummy=dummy,
                     batch_shape=batch_shape, step=step)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def _data_iterator(config, task, data_iter_fn, skips):
    """The train iterator: ``data_iter_fn``, else the task's."""
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if data_iter_fn is not None:
        it = data_iter_fn(config, **where)
    else:
        it = task.data_iterator(config, skips=skips, **where)
    if not isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator)):
        raise TypeError(f"the train data must be a grain iterator (DatasetIterator or "
                        f"DataLoaderIterator) so its position can be checkpointed; got "
                        f"{type(it).__name__}")
    return it


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(config: ml_collections.ConfigDict, workdir: str, task: Task, *,
          evaluators: Mapping[str, Callable] | None = None,
          data_iter_fn: Callable | None = None, devices=None,
          pretrained: Mapping[str, Any] | None = None, fresh: str | None = None) -> dict:
    """Trains ``task`` as ``config`` says, in ``workdir``, resuming from its newest checkpoint.

    config: sections ``train`` (see default_config), ``optim`` (optim.default_config) and
        ``data`` (needs ``batch_size``, the global batch); ``train`` and ``optim`` are checked
        for unknown keys here, the whole config by the CLI.
    evaluators: ``{name: fn(params) -> results}`` (each with an ``every`` attribute: run every
        that many steps, 0 = only at the end); results go to ``eval_<name>_<step>.json``.
    data_iter_fn: ``fn(config, *, process_index, process_count)`` → a grain iterator of this
        process's batches (dicts of arrays, ``batch_size / process_count`` rows each);
        default: ``task.data_iterator``.
    devices: the mesh's devices (default: all).
    pretrained, fresh: weights loaded before the rest is initialised (state.init_params);
        ignored when resuming. With LoRA on, ``lora/`` params are always fresh.
    LoRA (``config.lora``, see medvl_jax.models.lora): with ``rank > 0`` and an empty
        ``optim.freeze`` everything but the ``lora/`` factors is frozen (see optim_config).

    Returns ``{evaluator name: results}`` of the final evaluation, or ``{"preempted_at":
    step}`` after a SIGTERM.
    """
    if not isinstance(task, Task):
        raise TypeError(f"{type(task).__name__} is not a task: subclass "
                        f"medvl_jax.tasks.base.Task")
    validate_config(config.train, default_config(), prefix="train.")
    validate_config(config.optim, optim.default_config(), prefix="optim.")
    tc = config.train
    if lora_lib.enabled(lora_lib.get_config(config)):  # Pretrained weights never hold factors.
        fresh = f"^{lora_lib.LORA_KEY}/" + (f"|(?:{fresh})" if fresh else "")
    os.makedirs(workdir, exist_ok=True)

    # --- mesh ------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(dict(tc.mesh), devices)
    dp = mesh_lib.data_parallel_size(mesh)
    bs = int(config.data.batch_size)
    _check_batch(bs, dp, int(config.optim.grad_accum), mesh)

    # --- data ------------------------------------------------------------------------------
    skips = SkipCounter(float(config.data.get("max_skip_fraction", 1.0)))
    data_iter = _data_iterator(config, task, data_iter_fn, skips)
    spikes = guards.SpikeGuard(tc.skip_loss_spikes)

    # --- optimizer, state shapes and shardings, the jitted step ---------------------------
    parts = build_step(config, task, mesh, spike_guard=spikes.enabled)
    init_rng, step_rng = run_keys(tc.seed)

    manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                         keep=tc.keep_checkpoints,
                                         async_save=tc.async_checkpoints)
    meta = ckpt_lib.metadata(config, task.name)
    latest = manager.latest_step()
    if latest is not None:
        state, saved_meta = manager.restore(latest, parts.target, data_iter)
        ckpt_lib.check_compatible(saved_meta, meta)
        skips.restore(saved_meta.get("skips"))
        spikes.restore(saved_meta.get("spikes"))
        print(f"resumed from step {latest} in {workdir}")
    else:
        state, _ = state_lib.init_state(task.init, parts.tx, mesh, init_rng, parts.dummy,
                                        pretrained=pretrained, fresh=fresh)
    batch_sharding = parts.batch_sharding
    step_jit = parts.step
    step_fn = None

    # --- metrics ----------------------------------------------------------------------------
    lead = jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(workdir, enabled=lead)
    start = int(state.step)
    progress = metrics_lib.Progress(start, tc.steps, enabled=bool(tc.progress) and lead)
    evals = dict(evaluators or {})
    flops_per_device = None  # FLOPs of one step on one device.
    window_t, window_steps, window_tokens = time.perf_counter(), 0, 0

    def run_evals(step: int, final: bool) -> dict:
        out = {}
        for name, fn in evals.items():
            if final or (fn.every and step % fn.every == 0):
                out[name] = fn(state.params)
                writer.write_eval(step, out[name], name=name)
        return out

    # --- tasks that make their batches from the current params (GRPO rollouts) -------------
    mu = int(task.updates_per_batch)
    if mu > 1 and tc.checkpoint_every % mu:
        raise ConfigError(f"train.checkpoint_every={tc.checkpoint_every} must be a multiple of "
                         f"the task's {mu} updates per batch, so a resumed run starts a fresh "
                         f"batch exactly where the original did")
    rollout_rng = jax.random.fold_in(step_rng, 0x5A3)

    # --- checkpoints: good once the step after them is finite too -------------------------
    pending: list = []  # Per step (loss, loss_spike) on device, for the spike guard.
    unconfirmed = None  # (step, nonfinite_total) of the newest save until the step after it.

    def flush_spikes(update: bool) -> None:
        if spikes.enabled:
            got = jax.device_get(pending)
            pending.clear()
            if got:
                spikes.record(*zip(*got))
            if update:
                spikes.update()

    def save(done: int, *, force: bool = False) -> None:
        nonlocal unconfirmed
        flush_spikes(update=False)
        manager.save(done, state, data_iter, {**meta, "skips": skips.state(),
                                              "spikes": spikes.state()}, force=force)
        unconfirmed = (done, int(state.nonfinite_total))

    def close() -> None:
        manager.wait()
        progress.close()
        writer.close()
        if skips.total:
            print(skips.summary())

    # --- the loop ---------------------------------------------------------------------------
    with guards.Preempted() as preempted:
        fetch = guards.DataFetcher(data_iter, timeout_s=tc.data_timeout_s, preempted=preempted,
                                   describe=skips.summary)
        try:
            for step in range(start, tc.steps):
                if step % mu == 0 or step == start:  # A new batch every `mu` updates.
                    local = task.prepare_batch(state.params, fetch(),
                                               jax.random.fold_in(rollout_rng, step))
                    batch = mesh_lib.global_batch_from_local(local, mesh, batch_sharding)
                args = (state, batch, step_rng) + (
                    (jnp.asarray(spikes.threshold, jnp.float32),) if spikes.enabled else ())
                if step_fn is None:
                    with rules_lib.activation_rules(mesh):
                        step_fn = step_jit.lower(*args).compile()
                    if task.flops_per_example:
                        flops_per_device = (float(task.flops_per_example) * bs
                                            / len(mesh.devices.flat))
                    else:
                        flops_per_device = metrics_lib.compiled_flops(step_fn)
                    window_t = time.perf_counter()  # Compilation is not step time.
                state, m = step_fn(*args)
                if spikes.enabled:
                    pending.append((m["loss"], m["loss_spike"]))
                window_steps += 1
                window_tokens += task.count_tokens(local) * jax.process_count()
                done = step + 1
                if unconfirmed and done == unconfirmed[0] + 1:
                    if int(state.nonfinite_total) == unconfirmed[1]:
                        manager.mark_good(unconfirmed[0])
                    unconfirmed = None
                logging = done % tc.log_every == 0 or done == tc.steps
                if logging:
                    m = jax.device_get(m)
                    flush_spikes(update=True)
                    worst, total = int(state.nonfinite_worst_streak), int(state.nonfinite_total)
                    dt = time.perf_counter() - window_t
                    row = {k: float(v) for k, v in m.items()}
                    row.update(step_time=dt / window_steps, examples_per_s=window_steps * bs / dt,
                               skipped_nonfinite=total, skipped_examples=skips.total)
                    if spikes.enabled:
                        row["skipped_spikes"] = spikes.skipped
                    if window_tokens:
                        row["tokens_per_s"] = window_tokens / dt
                    row.update(task.host_metrics())  # Host-side work (GRPO rollouts).
                    if flops_per_device and tc.peak_flops_per_device:
                        row["mfu"] = (flops_per_device * window_steps / dt
                                      / tc.peak_flops_per_device)
                    writer.write(done, row)
                    progress.update(done, row)
                    window_t, window_steps, window_tokens = time.perf_counter(), 0, 0
                    if worst >= tc.max_nonfinite_in_a_row:
                        close()
                        good = manager.set_aside_unconfirmed(
                            os.path.join(workdir, "checkpoints_nonfinite"))
                        where = (f"resuming starts from its newest good checkpoint, step {good}"
                                 if good is not None else
                                 "it has no good checkpoint, so resuming starts afresh")
                        raise FloatingPointError(
                            f"{worst} steps in a row had a non-finite loss, gradient or update "
                            f"(by step {done}; train.max_nonfinite_in_a_row="
                            f"{tc.max_nonfinite_in_a_row}); stopping. In {workdir}, {where} "
                            f"(lower optim.lr, or look at the data).")
                else:
                    progress.update(done)
                # Several processes agree at log steps, so all of them save the same step.
                if (logging or jax.process_count() == 1) and preempted.any_process():
                    save(done, force=True)
                    close()
                    print(f"SIGTERM: saved step {done} in {workdir}; exiting")
                    return {"preempted_at": done}
                if tc.checkpoint_every and (done % tc.checkpoint_every == 0
                                            or done == tc.steps):
                    save(done)
                if done != tc.steps:
                    run_evals(done, final=False)
        except guards.PreemptedWaitingForData as e:
            close()
            print(f"{e}: nothing saved (the data position is mid-read); the resume point is "
                  f"step {manager.latest_step()}")
            return {"preempted_at": None}
        except (guards.DataStall, TooManyBadRecords):
            close()
            raise
    progress.close()
    manager.wait()
    if skips.total:
        print(skips.summary())
    results = run_evals(int(state.step), final=True)
    writer.close()
    return results
