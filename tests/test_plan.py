"""python -m medvl_jax.plan: the loop's step compiled for TPU topologies on this CPU machine.

Needs libtpu (the ``tpu`` extra, installed by the README's test command)."""
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

pytest.importorskip("libtpu", reason='planning needs the tpu extra: pip install -e ".[tpu]"')

from medvl_jax import plan  # noqa: E402
from medvl_jax.parallel import rules as rules_lib  # noqa: E402
from medvl_jax.tasks import base  # noqa: E402
from medvl_jax.train import loop  # noqa: E402
from tests.train import tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    """x [B, D] -> Dense(D->H) -> gelu -> Dense(H->D); ``shard_hidden=False`` leaves the first
    kernel without logical axes (so unsharded)."""
    d: int
    h: int
    shard_hidden: bool = True

    @nn.compact
    def __call__(self, x):
        p = nn.with_logical_partitioning
        init = nn.initializers.lecun_normal()
        k1 = p(init, ("embed", "mlp")) if self.shard_hidden else init
        x = nn.Dense(self.h, kernel_init=k1, use_bias=False, name="hidden")(x)
        return nn.Dense(self.d, kernel_init=p(init, ("mlp", "embed")), use_bias=False,
                        name="out")(jax.nn.gelu(x))


class NetTask(base.Task):
    """Mean squared reconstruction error of :class:`Net`."""
    name = "net"

    def __init__(self, d, h, shard_hidden=True):
        super().__init__(ml_collections.ConfigDict())
        self.d, self.model = d, Net(d, h, shard_hidden)

    def dummy_batch(self, batch_size):
        return {"x": np.zeros((batch_size, self.d), np.float32)}

    def init(self, rng, batch):
        return self.model.init(rng, batch["x"])["params"]

    def loss(self, params, batch, rng):
        y = self.model.apply({"params": params}, batch["x"])
        return jnp.mean((y - batch["x"]) ** 2), {}


def _config(batch=32, fsdp=-1):
    c = tiny.config(mesh={"data": 1 if fsdp == -1 else -1, "fsdp": fsdp, "tensor": 1})
    c.data.batch_size = batch
    return c


def _expected_param_bytes(task, config, mesh_shape):
    """Per-device bytes of the params from their logical axes, divided by hand."""
    boxed = jax.eval_shape(task.init, jax.random.key(0), task.dummy_batch(2))
    rules = dict(rules_lib.RULES)
    total = 0
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * leaf.ndim
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        shape = []
        for size, name in zip(value.shape, names):
            axes = rules.get(name) if name else None
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            shape.append(-(-size // math.prod(mesh_shape[a] for a in axes)))
        total += math.prod(shape) * np.dtype(value.dtype).itemsize
    return total


def test_v5p_param_bytes_flops_and_memory():
    """Parameter and optimizer bytes per device equal the shard sizes worked out by hand from
    the logical axes; the train FLOPs equal the hand count; the compiled program's arguments
    hold at least the state and batch."""
    devices = plan.topology_devices("v5p:2x2x1")
    d, h, b = 256, 1024, 32
    task, config = NetTask(d, h), _config(batch=b)
    record = plan.summarise(plan.compile_step(config, devices, task=task), devices, 0.1)
    assert record["chip"] == "v5p" and record["devices"] == 4
    assert record["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    want = _expected_param_bytes(task, config, record["mesh"])
    assert want == 2 * d * h * 4 // 4  # Both kernels split four ways.
    mem = record["bytes_per_device"]
    assert mem["parameters"] == want
    # Adam's two moments and two int32 step counts (Adam's, the lr schedule's).
    assert mem["optimizer_state"] == 2 * want + 8
    assert mem["batch"] == b // 4 * d * 4
    assert mem["arguments"] >= mem["parameters"] + mem["optimizer_state"] + mem["batch"]
    assert record["hbm_bytes_per_device"] == 95 * 2 ** 30 and record["fits"]
    # Forward 2·B·D·H per matmul; backward: both weight gradients, one input gradient (the
    # input x needs none).
    assert record["train_flops_per_step"] == 10 * b * d * h
    assert record["estimate"]["step_seconds"] > 0


def test_unsharded_weight_shows_in_the_report():
    """A weight whose sharding is left out is gathered no more but held whole: its full size
    appears in the per-device parameter bytes, and the sharded twin's all-gather of exactly
    that weight (bf16 on TPU, either orientation) is gone."""
    devices = plan.topology_devices("v5e:2x2")
    d, h = 256, 1024
    sharded = plan.compile_step(_config(), devices, task=NetTask(d, h))
    unsharded = plan.compile_step(_config(), devices, task=NetTask(d, h, shard_hidden=False))
    grow = unsharded["bytes_per_device"]["parameters"] - sharded["bytes_per_device"]["parameters"]
    assert grow == d * h * 4 * 3 // 4

    def weight_gathers(r):
        return [s.split("{")[0] for s in r["collectives"]["all-gathers"]
                if plan._shape_bytes(s) in (d * h * 2, d * h * 4)]

    # The hidden kernel [D, H] is gathered (in bf16 for the TPU's matmul) when sharded only.
    assert f"bf16[{d},{h}]" in weight_gathers(sharded)
    assert f"bf16[{d},{h}]" not in weight_gathers(unsharded)
    assert len(weight_gathers(unsharded)) == len(weight_gathers(sharded)) - 1
    assert sharded["collectives"]["all-gather"]["count"] == unsharded["collectives"][
        "all-gather"]["count"] + 1


def test_a_step_too_large_is_reported_as_not_fitting():
    """4.3B parameters with Adam (69 GB) cannot fit four 16 GiB v5e chips."""
    devices = plan.topology_devices("v5e:2x2")
    task = NetTask(16384, 131072)
    record = plan.summarise(plan.compile_step(_config(batch=8), devices, task=task),
                            devices, 0.1)
    assert record["parameters"] == 2 * 16384 * 131072
    assert record["bytes_per_device"]["parameters"] == 2 * 16384 * 131072 * 4 // 4
    # The TPU compiler itself refuses it; the report keeps its numbers and says so.
    assert "exceeds available HBM" in record["compiler_out_of_memory"]
    assert record["bytes_per_device"]["temporaries"] > 0
    assert record["total_bytes_per_device"] > 16 * 2 ** 30
    assert not record["fits"]
    assert "DOES NOT FIT" in plan.format_plan(dict(record, config="x", overrides=[],
                                                   topology="v5e:2x2"))


def test_plan_compiles_the_loops_step(monkeypatch):
    """The planner gets its step from loop.build_step, the loop's builder: no second copy."""
    calls = []
    real = loop.build_step

    def spy(*args, **kwargs):
        parts = real(*args, **kwargs)
        calls.append(parts)
        return parts

    monkeypatch.setattr(loop, "build_step", spy)
    devices = plan.topology_devices("v5e:2x2")
    plan.compile_step(_config(), devices, task=NetTask(64, 128))
    assert len(calls) == 1


def test_suggestions_in_order():
    c = ml_collections.ConfigDict({
        "train": {"mesh": {"data": -1, "fsdp": 1, "tensor": 1}},
        "optim": {"grad_accum": 1}, "data": {"batch_size": 8},
        "model": {"vision": {"remat_policy": "none"}, "text": {"remat_policy": "dots"}}})
    fsdp = ("train.mesh", {"data": 1, "fsdp": -1, "tensor": 1})
    remat = [("model.vision.remat_policy", "full"), ("model.text.remat_policy", "full")]
    assert plan.suggestions(c) == [
        [fsdp], [fsdp, *remat], [fsdp, *remat, ("optim.grad_accum", 2)],
        [fsdp, *remat, ("optim.grad_accum", 4)], [fsdp, *remat, ("optim.grad_accum", 8)]]


def test_cli_plans_grpo_with_its_rollout(tmp_path):
    """The command on a real (tiny) config: exit 0, a report, a JSON record with the rollout."""
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    p = subprocess.run([sys.executable, "-m", "medvl_jax.plan", "--config",
                        "configs/medsynth_grpo.py:smoke", "--topology", "v5e:2x2",
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fits" in p.stdout and "rollout" in p.stdout
    assert "E0000" not in p.stderr and "WARNING" not in p.stderr, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["chip"] == "v5e" and r["devices"] == 4 and r["task"] == "grpo"
    roll = r["rollout"]
    assert roll["batch"] == 8 and roll["max_new_tokens"] == 8
    assert roll["flops"] > 0 and roll["bytes_per_device"]["arguments"] > 0
    # The smoke run trains every weight with the KL term: a reference copy stays on device,
    # sharded like the params; the rollout runs beside the whole train state.
    mem = r["bytes_per_device"]
    assert mem["reference"] == mem["parameters"]
    assert roll["total_bytes_per_device"] >= (mem["parameters"] + mem["optimizer_state"]
                                              + mem["reference"])


def test_cli_errors_name_the_problem(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    p = subprocess.run([sys.executable, "-m", "medvl_jax.plan", "--config",
                        "configs/medsynth_grpo.py:smoke", "--topology", "v9z:2x2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "--topology 'v9z:2x2'" in p.stderr and "v5e:2x2" in p.stderr


def test_with_libtpu_and_no_tpu_jax_stays_on_cpu_quietly():
    """The tpu extra must not make the CPU path noisier: importing medvl_jax first keeps JAX
    from probing for TPUs that are not there."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    p = subprocess.run([sys.executable, "-c", "import medvl_jax, jax; print(jax.devices())"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "CpuDevice" in p.stdout
    assert p.stderr == "", p.stderr
