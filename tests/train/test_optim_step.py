"""Optimizer and train step on a tiny linear task, against hand formulas."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.tasks import base
from medvl_jax.train import loop, optim
from medvl_jax.train import state as state_lib


class LinearTask(base.Task):
    """loss = mean((x @ w + b - y)^2) over the batch."""

    def __init__(self):
        super().__init__(ml_collections.ConfigDict())

    def loss(self, params, batch, rng):
        pred = batch["x"] @ params["w"] + params["b"]
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"mean_pred": pred.mean()}


def _cfg(**kw):
    c = optim.default_config()
    c.update(kw)
    return c


def _state(params, tx):
    return state_lib.new_state(params, tx)


def _data(n=8, seed=0):
    r = np.random.default_rng(seed)
    return {"x": r.normal(size=(n, 3)).astype(np.float32),
            "y": r.normal(size=(n, 2)).astype(np.float32)}


PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}


def test_schedule_matches_hand_formula():
    c = _cfg(lr=0.1, warmup_steps=10, schedule="cosine", end_lr_fraction=0.1)
    s = optim.schedule(c, total_steps=110)
    assert float(s(5)) == pytest.approx(0.05)
    for t in (10, 40, 110):
        frac = (t - 10) / 100
        want = 0.1 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        assert float(s(t)) == pytest.approx(want, rel=1e-5)
    lin = optim.schedule(_cfg(lr=0.1, warmup_steps=0, schedule="linear"), total_steps=100)
    assert float(lin(25)) == pytest.approx(0.075)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.schedule(_cfg(schedule="step"), 10)


def test_adamw_first_step_and_freezing():
    c = _cfg(lr=0.01, warmup_steps=0, schedule="constant", clip_norm=0.0, freeze="^b$")
    tx, sched = optim.make_optimizer(c, PARAMS, 10)
    step = jax.jit(loop.make_train_step(LinearTask(), tx, sched, grad_accum=1))
    batch = _data()
    new, m = step(_state(PARAMS, tx), batch, jax.random.key(0))
    # Adam's first update is lr * g / (|g| + eps) = lr * sign(g) elementwise.
    g = jax.grad(lambda p: LinearTask().loss(p, batch, None)[0])(PARAMS)
    np.testing.assert_allclose(new.params["w"], PARAMS["w"] - 0.01 * np.sign(g["w"]), rtol=1e-5)
    np.testing.assert_array_equal(new.params["b"], PARAMS["b"])  # Frozen: bit-identical.
    assert int(new.step) == 1
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.make_optimizer(_cfg(freeze="^nothing$"), PARAMS, 10)


def test_frozen_params_get_no_gradient_and_grad_norm_is_the_clipped_one():
    """With ``b`` frozen, grad_norm is |dL/dw| (the norm clipping sees, hand formula), and
    dL/db is not computed: the step has one reduction fewer."""
    c = _cfg(lr=0.01, warmup_steps=0, schedule="constant", clip_norm=1e-3, freeze="^b$")
    tx, sched = optim.make_optimizer(c, PARAMS, 10)
    labels = optim.param_labels(PARAMS, c)
    step = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 1, labels=labels))
    batch = _data()
    new, m = step(_state(PARAMS, tx), batch, jax.random.key(0))
    x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
    resid = x @ np.ones((3, 2)) - y  # b = 0.
    g_w = 2 * x.T @ resid / resid.size
    assert float(m["grad_norm"]) == pytest.approx(np.linalg.norm(g_w), rel=1e-5)
    unfrozen = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 1))
    _, m_all = unfrozen(_state(PARAMS, tx), batch, jax.random.key(0))
    assert float(m_all["grad_norm"]) > float(m["grad_norm"])  # It counted dL/db too.
    np.testing.assert_array_equal(new.params["b"], PARAMS["b"])
    # dL/db = sum of the residuals over the batch is a reduce_sum the frozen step lacks.
    jaxpr = str(jax.make_jaxpr(loop.make_train_step(LinearTask(), tx, sched, 1, labels=labels))(
        _state(PARAMS, tx), batch, jax.random.key(0)))
    assert jaxpr.count("reduce_sum") < str(jax.make_jaxpr(
        loop.make_train_step(LinearTask(), tx, sched, 1))(
            _state(PARAMS, tx), batch, jax.random.key(0))).count("reduce_sum")


def test_lr_groups_scale_the_update():
    c = _cfg(lr=0.01, warmup_steps=0, schedule="constant", clip_norm=0.0, lr_groups={"^b$": 0.5})
    tx, sched = optim.make_optimizer(c, PARAMS, 10)
    batch = _data()
    new, _ = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 1))(
        _state(PARAMS, tx), batch, jax.random.key(0))
    g = jax.grad(lambda p: LinearTask().loss(p, batch, None)[0])(PARAMS)
    np.testing.assert_allclose(new.params["b"], -0.005 * np.sign(g["b"]), rtol=1e-5)
    with pytest.raises(ValueError, match=r"'\^c\$' matches no parameter"):
        optim.make_optimizer(_cfg(lr_groups={"^c$": 0.5}), PARAMS, 10)
    # A group whose parameters are all frozen (LoRA on a config with groups) is no error.
    optim.make_optimizer(_cfg(freeze="^b$", lr_groups={"^b$": 0.5}), PARAMS, 10)


def test_grad_accumulation_equals_one_big_batch():
    c = _cfg(lr=0.01, warmup_steps=0, schedule="constant", clip_norm=0.5)
    tx, sched = optim.make_optimizer(c, PARAMS, 10)
    batch = _data(16)
    one = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 1))
    four = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 4))
    s1, s4 = _state(PARAMS, tx), _state(PARAMS, tx)
    for i in range(3):
        s1, m1 = one(s1, batch, jax.random.key(0))
        s4, m4 = four(s4, batch, jax.random.key(0))
        np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    for k in PARAMS:
        np.testing.assert_allclose(s1.params[k], s4.params[k], rtol=1e-6, atol=1e-7)


def test_non_finite_batch_is_skipped_and_counted():
    c = _cfg(lr=0.01, warmup_steps=0, schedule="constant")
    tx, sched = optim.make_optimizer(c, PARAMS, 10)
    step = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 1))
    good, bad = _data(), _data()
    bad["x"][0, 0] = np.nan
    s, _ = step(_state(PARAMS, tx), good, jax.random.key(0))
    s_bad, m = step(s, bad, jax.random.key(0))
    assert not np.isfinite(float(m["loss"]))
    for k in PARAMS:
        np.testing.assert_array_equal(s_bad.params[k], s.params[k])
    assert int(s_bad.nonfinite_total) == 1 and int(s_bad.nonfinite_streak) == 1
    s_bad2, _ = step(s_bad, bad, jax.random.key(0))
    assert int(s_bad2.nonfinite_streak) == 2
    s_ok, _ = step(s_bad2, good, jax.random.key(0))
    assert int(s_ok.nonfinite_streak) == 0 and int(s_ok.nonfinite_total) == 2
    assert int(s_ok.step) == 4 and int(s_ok.nonfinite_worst_streak) == 2


def test_grad_accumulation_on_a_sharded_batch():
    """Strided microbatches on an 8-way data-parallel mesh still equal the whole batch."""
    mesh = mesh_lib.make_mesh({"data": 8})
    c = _cfg(lr=0.01, warmup_steps=0, schedule="constant", clip_norm=0.5)
    tx, sched = optim.make_optimizer(c, PARAMS, 10)
    batch = mesh_lib.global_batch_from_local(_data(32, seed=3), mesh)
    one = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 1, mesh))
    four = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 4, mesh))
    s1, m1 = one(_state(PARAMS, tx), batch, jax.random.key(0))
    s4, m4 = four(_state(PARAMS, tx), batch, jax.random.key(0))
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-6)
    for k in PARAMS:
        np.testing.assert_allclose(s1.params[k], s4.params[k], rtol=1e-6, atol=1e-7)


def test_lr_group_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="lr_groups pattern '\\^nothing'"):
        optim.make_optimizer(_cfg(lr_groups={"^nothing": 2.0}), PARAMS, 10)


def test_weight_decay_skips_vectors():
    """AdamW's first step with decay: w -= lr * (sign(g) + wd * w) for the matrix only."""
    params = {"w": jnp.full((3, 2), 2.0), "b": jnp.full((2,), 3.0)}
    c = _cfg(lr=0.01, warmup_steps=0, schedule="constant", clip_norm=0.0, weight_decay=0.1)
    tx, sched = optim.make_optimizer(c, params, 10)
    batch = _data()
    new, _ = jax.jit(loop.make_train_step(LinearTask(), tx, sched, 1))(
        _state(params, tx), batch, jax.random.key(0))
    g = jax.grad(lambda p: LinearTask().loss(p, batch, None)[0])(params)
    np.testing.assert_allclose(new.params["w"], 2.0 - 0.01 * (np.sign(g["w"]) + 0.1 * 2.0),
                               rtol=1e-5)
    np.testing.assert_allclose(new.params["b"], 3.0 - 0.01 * np.sign(g["b"]), rtol=1e-5)
