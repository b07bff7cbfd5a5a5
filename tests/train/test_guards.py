"""Guards of the loop: non-finite steps skipped and counted, too many in a row abort, config
typos and indivisible batches fail before any work."""
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvl_jax.train import checkpoint as ckpt_lib
from medvl_jax.train import loop
from tests.train import tiny


def _poisoned(bad_batches):
    """tiny.data_iter, with NaN inputs in the batches (0-based) of ``bad_batches``."""

    def fn(config, *, process_index=0, process_count=1):
        d = config.data
        ds = grain.MapDataset.source(tiny._examples(d.num_examples, d.seed)).shuffle(seed=d.seed)
        ds = ds.repeat(None).batch(d.batch_size, drop_remainder=True)

        def poison(i, b):
            if i in bad_batches:
                b = {**b, "x": np.full_like(b["x"], np.nan)}
            return b

        return iter(ds.map_with_index(poison))

    return fn


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return list(map(json.loads, f))


def _params(workdir):
    mngr = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = mngr.latest_step()
    return step, jax.tree.map(np.asarray, mngr.restore_state(step)["params"])


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    clean, bad = str(tmp_path / "clean"), str(tmp_path / "bad")
    loop.train(tiny.config(steps=2), clean, tiny.TinyTask(), data_iter_fn=_poisoned(set()))
    loop.train(tiny.config(steps=3, max_nonfinite_in_a_row=2), bad, tiny.TinyTask(),
               data_iter_fn=_poisoned({2}))
    rows = _rows(bad)
    assert [r["skipped_nonfinite"] for r in rows] == [0, 0, 1]
    assert not np.isfinite(rows[2]["loss"])
    # Step 3 applied no update: the parameters are those after step 2, bit for bit.
    (s1, p_clean), (s2, p_bad) = _params(clean), _params(bad)
    assert (s1, s2) == (2, 3)
    jax.tree.map(np.testing.assert_array_equal, p_clean, p_bad)


def test_too_many_non_finite_steps_in_a_row_abort(tmp_path):
    # Two bad steps, a good one, then three bad ones: only the second run trips the limit.
    cfg = tiny.config(steps=8, max_nonfinite_in_a_row=3, log_every=4)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had a non-finite loss, "
                                                 r"gradient or update \(by step 8"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=_poisoned({0, 1, 3, 4, 5}))
    rows = _rows(str(tmp_path))
    assert [r["step"] for r in rows] == [4, 8] and rows[-1]["skipped_nonfinite"] == 5


def test_huge_lr_keeps_the_last_finite_checkpoint_restorable(tmp_path):
    """lr=1e30 after a good run: every update is far too large (its norm overflows), so none
    is applied and the weights stay the good ones; with keep_checkpoints=1 and a save every
    step, the good checkpoint is neither rotated away nor shadowed: the run stops, the later
    checkpoints are moved aside, and a resume starts from the good one."""
    wd = str(tmp_path)
    loop.train(tiny.config(steps=4, checkpoint_every=2), wd, tiny.TinyTask(),
               data_iter_fn=tiny.data_iter)
    good_step, good_params = _params(wd)
    cfg = tiny.config(steps=20, checkpoint_every=1, keep_checkpoints=1,
                      max_nonfinite_in_a_row=3, log_every=1)
    cfg.optim.lr = 1e30
    with pytest.raises(FloatingPointError, match=r"newest good checkpoint, step 4"):
        loop.train(cfg, wd, tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    rows = [r for r in _rows(wd) if r["step"] > 4]
    assert [r["skipped_nonfinite"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)  # The weights never left the good ones.
    assert good_step == 4 and _params(wd)[0] == 4
    jax.tree.map(np.testing.assert_array_equal, _params(wd)[1], good_params)
    # Saved: 5, then 6 (5 rotated out: keep=1, but 4, the newest good one, stays); the run
    # stops at the log line of step 7, before its save.
    aside = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints_nonfinite")))
    assert aside == [6]
    # What was moved aside is finite (the state always is): the same weights, a later step.
    mngr = ckpt_lib.CheckpointManager(os.path.join(wd, "checkpoints_nonfinite"))
    jax.tree.map(np.testing.assert_array_equal, mngr.restore_state(6)["params"], good_params)


def test_update_that_overflows_the_weights_is_not_applied():
    """A finite loss and gradient whose update overflows float32 (an optimizer scaling the
    gradient by 1e30 twice): the step is rejected and counted, the weights stay as they were."""
    import optax
    from medvl_jax.train import state as state_lib

    task = tiny.TinyTask()
    big = jnp.float32(1e30)
    tx = optax.stateless(lambda g, p: jax.tree.map(lambda x: x * big * big, g))
    batch = next(tiny.data_iter(tiny.config()))
    params = jax.tree.map(lambda x: getattr(x, "value", x), task.init(jax.random.key(0), batch),
                          is_leaf=lambda x: hasattr(x, "value"))
    grads = jax.grad(lambda p: task.loss(p, batch, None)[0])(params)
    assert any((np.asarray(g) != 0).any() for g in jax.tree.leaves(grads))  # So p - inf*g.
    step = jax.jit(loop.make_train_step(task, tx, lambda s: 1.0, 1))
    new, m = step(state_lib.new_state(params, tx), batch, jax.random.key(1))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert int(new.nonfinite_total) == 1 and int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.params, params)


def test_loss_spike_is_not_applied(tmp_path):
    """skip_loss_spikes=2: after 20 applied steps, a step whose loss exceeds 2 x the median of
    the applied losses before it is not applied and is counted. Batches 22 and 24 have every
    label shifted (a confidently wrong batch, a loss spike)."""

    def shifted(bad):
        def fn(config, *, process_index=0, process_count=1):
            d = config.data
            ds = grain.MapDataset.source(tiny._examples(d.num_examples, d.seed))
            ds = ds.shuffle(seed=d.seed).repeat(None).batch(d.batch_size, drop_remainder=True)
            return iter(ds.map_with_index(
                lambda i, b: {**b, "y": (b["y"] + 1) % tiny.CLASSES} if i in bad else b))
        return fn

    wd = str(tmp_path)
    loop.train(tiny.config(steps=26, skip_loss_spikes=2.0, log_every=1), wd, tiny.TinyTask(),
               data_iter_fn=shifted({22, 24}))
    rows = _rows(wd)
    applied, want = [], []
    for r in rows:  # The rule, in NumPy, from the logged losses.
        spike = len(applied) >= 20 and r["loss"] > 2.0 * np.median(applied[-100:])
        want.append(float(spike))
        if not spike:
            applied.append(r["loss"])
    assert [r["loss_spike"] for r in rows] == want
    assert want[22] == want[24] == 1.0 and sum(want) == 2
    assert rows[-1]["skipped_spikes"] == 2 and rows[-1]["skipped_nonfinite"] == 0


def test_config_typo_fails_fast_naming_the_key(tmp_path):
    cfg = tiny.config()
    cfg.train.stepz = 3
    with pytest.raises(KeyError, match=r"train\.stepz.*did you mean steps"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    cfg = tiny.config()
    cfg.optim.warmup = 3
    with pytest.raises(KeyError, match=r"optim\.warmup"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    # A whole config against a schema of defaults, nested sections included.
    schema = tiny.config()
    cfg = tiny.config()
    cfg.data.num_exampels = 5
    with pytest.raises(KeyError, match=r"data\.num_exampels.*num_examples"):
        loop.validate_config(cfg, schema)
    cfg = tiny.config()
    cfg.modle = {}
    with pytest.raises(KeyError, match="'modle'"):
        loop.validate_config(cfg, schema)
    assert not os.listdir(tmp_path)  # Nothing was written.


def test_indivisible_batch_fails_fast(tmp_path):
    cfg = tiny.config()
    cfg.data.batch_size = 12
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the data-parallel "
                                         r"size 8"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    cfg = tiny.config(mesh={"data": 2, "fsdp": 2, "tensor": 2})
    cfg.data.batch_size = 12
    cfg.optim.grad_accum = 2
    with pytest.raises(ValueError, match=r"not divisible by optim.grad_accum=2 x the "
                                         r"data-parallel size 4"):
        loop.train(cfg, str(tmp_path), tiny.TinyTask(), data_iter_fn=tiny.data_iter)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_non_grain_data_is_refused(tmp_path):
    with pytest.raises(TypeError, match="must be a grain iterator"):
        loop.train(tiny.config(), str(tmp_path), tiny.TinyTask(),
                   data_iter_fn=lambda c, **kw: iter([]))
