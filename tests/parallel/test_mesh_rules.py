"""Mesh construction, the logical-axis rules and batch placement, on 8 fake CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from medvl_jax.parallel import mesh as mesh_lib
from medvl_jax.parallel import rules


def test_make_mesh_sizes_and_errors():
    m = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    m = mesh_lib.make_mesh({"tensor": 2}, devices=jax.devices()[:2])  # Missing axes are 1.
    assert dict(m.shape) == {"data": 1, "fsdp": 1, "tensor": 2}
    assert mesh_lib.data_parallel_size(mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})) \
        == 4
    with pytest.raises(ValueError, match="8 devices do not divide"):
        mesh_lib.make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        mesh_lib.make_mesh({"data": 2, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_lib.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="at most one"):
        mesh_lib.make_mesh({"data": -1, "fsdp": -1})


def test_rules_table_maps_names_to_mesh_axes():
    # The intended layout, written out by hand: weights split over fsdp along the model width
    # and over tensor along heads/mlp/vocab; a mesh axis is used once per array.
    want = {("batch", "length", "embed"): P(("data", "fsdp"), None, None),
            ("embed", "mlp"): P("fsdp", "tensor"),
            ("mlp", "embed"): P("tensor", "fsdp"),
            ("vocab", "embed"): P("tensor", "fsdp"),
            ("embed", "heads", "head_dim"): P("fsdp", "tensor", None),
            ("embed", "kv_heads", "head_dim"): P("fsdp", "tensor", None),
            ("layers", "embed", "mlp"): P(None, "fsdp", "tensor"),
            ("vision_embed", "vision_mlp"): P("fsdp", "tensor"),
            ("vision_embed", "vision_heads", "head_dim"): P("fsdp", "tensor", None),
            ("unnamed_axis",): P(None)}
    for names, spec in want.items():
        assert rules.logical_to_spec(names) == spec, names


def test_logical_shardings_of_a_boxed_model():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            k = self.param("k", nn.with_logical_partitioning(nn.initializers.ones,
                                                             ("embed", "mlp")), (8, 4))
            b = self.param("b", nn.initializers.zeros, (4,))  # Unnamed: replicated.
            return x @ k + b

    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    boxed = jax.eval_shape(M().init, jax.random.key(0), jnp.ones((2, 8)))["params"]
    sh = rules.logical_shardings(boxed, mesh)
    assert sh["k"].spec == P("fsdp", "tensor") and sh["b"].spec == P()
    params = jax.jit(lambda r: nn.unbox(M().init(r, jnp.ones((2, 8)))["params"]),
                     out_shardings=sh)(jax.random.key(0))
    # Each device really holds a quarter of k: (8/2) x (4/2).
    assert {s.data.shape for s in params["k"].addressable_shards} == {(4, 2)}


def test_activation_constraints_apply_under_the_rules():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def f(x):
        return nn.with_logical_constraint(x * 2, ("batch", "mlp"))

    with rules.activation_rules(mesh):
        y = jax.jit(f)(jnp.ones((8, 4)))
    assert y.sharding.spec == P(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))


def test_global_batch_from_local():
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2})
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
             "y": np.arange(16, dtype=np.int32)}
    g = mesh_lib.global_batch_from_local(local, mesh)
    assert g["x"].shape == (16, 3) and g["x"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(g["x"]), local["x"])
    # One process: every device holds 16 / 8 = 2 consecutive rows.
    rows = sorted(int(s.data[0]) for s in g["y"].addressable_shards)
    assert rows == list(range(0, 16, 2))


def test_single_process_does_not_initialize_distributed(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert mesh_lib.maybe_initialize_distributed() is False
    assert not jax.distributed.is_initialized()
