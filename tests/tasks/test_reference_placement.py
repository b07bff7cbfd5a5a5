"""The frozen reference of a full fine-tune (GRPO's KL term) lives where the params live: a
device copy with each parameter's sharding, not a host pytree sent to one device per call."""
import flax.linen as nn
import jax
import numpy as np

from medvl_jax import config as config_lib
from medvl_jax.data import pipeline
from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.parallel import rules as rules_lib
from medvl_jax.tasks.policy import Policy


def test_reference_is_placed_like_the_params():
    config = config_lib.load_config("configs/medsynth_sft.py:smoke", {})
    policy = Policy(config, pipeline.make_tokenizer(config.tokenizer))
    dummy = policy.dummy_batch(2)
    boxed = jax.eval_shape(policy.init, jax.random.key(0), dummy)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    shardings = rules_lib.logical_shardings(boxed, mesh)
    host = nn.unbox(jax.jit(policy.init)(jax.random.key(0), dummy))
    params = jax.device_put(host, shardings)
    policy._reference = jax.tree.map(lambda x: np.asarray(x) + 1.0, host)  # Not the params.

    ref = policy.reference_params(params)
    for r, p, h in zip(jax.tree.leaves(ref), jax.tree.leaves(params), jax.tree.leaves(host)):
        assert isinstance(r, jax.Array) and r.sharding == p.sharding
        np.testing.assert_array_equal(np.asarray(r), np.asarray(h) + 1.0)
    assert any(len(p.sharding.device_set) == 2 and p.sharding.shard_shape(p.shape) != p.shape
               for p in jax.tree.leaves(params))  # Something is really split.
    assert policy.reference_params(params) is ref  # Placed once.
    # Traced (inside a jitted loss) it stays the host constant.
    kinds = jax.jit(lambda p: jax.tree.map(
        lambda r: float(isinstance(r, np.ndarray)), policy.reference_params(p)))(params)
    assert all(float(k) == 1.0 for k in jax.tree.leaves(kinds))


def test_dpo_from_scratch_traces_its_loss_before_anything_else():
    """From scratch the DPO reference is the run's initial weights; the loss can be traced
    (under a mesh, as the loop and the planner trace it) with nothing computed before, and at
    those weights every implicit reward is zero."""
    from medvl_jax.tasks.base import run_keys
    from medvl_jax.train import run

    config, task, _ = run.build(run.load("configs/medsynth_dpo.py:smoke"))
    batch = jax.tree.map(np.asarray, task.dummy_batch(2))
    init = nn.unbox(jax.jit(task.init)(run_keys(int(config.train.seed))[0], batch))
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    with rules_lib.activation_rules(mesh):
        _, metrics = jax.jit(lambda p: task.loss(p, batch, jax.random.key(1)))(init)
    assert float(metrics["chosen_reward"]) == 0.0 and float(metrics["rejected_reward"]) == 0.0
