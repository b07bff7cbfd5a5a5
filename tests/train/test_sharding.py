"""The loop on 8 fake CPU devices: the same losses on every mesh, parameters and optimizer
moments really sharded as the rules say, and pretrained weights merged strictly."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.train import loop, optim
from medvl_jax.train import state as state_lib
from tests.train import tiny


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f)]


def test_same_loss_on_every_mesh(tmp_path):
    losses = {}
    for shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        wd = str(tmp_path / "x".join(map(str, shape)))
        cfg = tiny.config(steps=3, checkpoint_every=0,
                          mesh=dict(zip(("data", "fsdp", "tensor"), shape)))
        loop.train(cfg, wd, tiny.TinyTask(), data_iter_fn=tiny.data_iter,
                   devices=jax.devices()[:int(np.prod(shape))])
        losses[shape] = _losses(wd)
    ref = losses[(1, 1, 1)]
    assert len(ref) == 3 and ref[-1] < ref[0]
    for shape, got in losses.items():
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=str(shape))


def _init(mesh, **kw):
    task = tiny.TinyTask()
    cfg = tiny.config()
    dummy = task.dummy_batch(16)
    _, shapes = state_lib.abstract_params(task.init, jax.random.key(0), dummy)
    tx, _ = optim.make_optimizer(cfg.optim, shapes, 10)
    return task, dummy, state_lib.init_state(task.init, tx, mesh, jax.random.key(0), dummy, **kw)


def test_params_and_moments_are_sharded_as_the_rules_say():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, _, (state, shardings) = _init(mesh)
    p = state.params
    # Logical names in tiny.MLP -> mesh axes, by the rules table:
    # embed -> fsdp, mlp -> tensor, vocab -> tensor (a mesh axis is used once per array).
    want = {"norm/scale": P("fsdp"), "hidden/kernel": P("fsdp", "tensor"),
            "hidden/bias": P("tensor"), "out/kernel": P(None, "tensor"), "out/bias": P("tensor")}
    flat = state_lib.flatten(p)
    assert {k: v.sharding.spec for k, v in flat.items() if k in want} == want
    # A device holds (8 / 2) x (16 / 2) of the hidden kernel.
    assert {s.data.shape for s in p["hidden"]["kernel"].addressable_shards} == {(4, 8)}
    # AdamW's moments follow their parameters; counters are replicated.
    mu = state.opt_state[2].inner_states["default"].inner_state[0].mu
    assert mu["hidden"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert state.step.sharding.spec == P()


def test_pretrained_weights_are_loaded_and_the_rest_initialised():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    r = np.random.default_rng(0)
    given = {"hidden": {"kernel": r.normal(size=(8, 16)).astype(np.float32),
                        "bias": r.normal(size=(16,)).astype(np.float64)}}  # Cast to float32.
    task, dummy, (state, _) = _init(mesh, pretrained=given, fresh="^(norm|out)/")
    p = state.params
    np.testing.assert_array_equal(np.asarray(p["hidden"]["kernel"]), given["hidden"]["kernel"])
    assert p["hidden"]["bias"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(p["hidden"]["bias"]),
                                  given["hidden"]["bias"].astype(np.float32))
    assert p["hidden"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # The rest is the model's own initialisation (flax init, unjitted, as the reference).
    ref = nn.unbox(task.init(jax.random.key(0), dummy))
    np.testing.assert_allclose(np.asarray(p["out"]["kernel"]), ref["out"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(p["norm"]["scale"]), ref["norm"]["scale"])
    # A flat {"a/b": array} dict works the same.
    _, _, (state2, _) = _init(mesh, pretrained={"hidden/kernel": given["hidden"]["kernel"]},
                              fresh="^(norm|out|hidden/bias)")
    np.testing.assert_array_equal(np.asarray(state2.params["hidden"]["kernel"]),
                                  given["hidden"]["kernel"])


def test_pretrained_merge_is_strict_and_names_the_keys():
    mesh = mesh_lib.make_mesh({"data": 8})
    good = {"hidden/kernel": np.zeros((8, 16), np.float32),
            "hidden/bias": np.zeros((16,), np.float32)}
    with pytest.raises(ValueError, match=r"missing .*norm/bias, norm/scale, out/bias"):
        _init(mesh, pretrained=good)
    with pytest.raises(ValueError, match=r"unexpected .*: hidden/extra"):
        _init(mesh, pretrained={**good, "hidden/extra": np.zeros(3)}, fresh="^(norm|out)/")
    with pytest.raises(ValueError, match=r"mis-shaped: hidden/kernel: checkpoint \(16, 8\), "
                                         r"model \(8, 16\)"):
        _init(mesh, pretrained={**good, "hidden/kernel": np.zeros((16, 8))},
              fresh="^(norm|out)/")
