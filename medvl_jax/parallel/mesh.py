"""Device meshes, batch placement and multi-host helpers.

The mesh always has the three axes ``('data', 'fsdp', 'tensor')`` (size 1 where unused), so
the logical-axis rules (rules.py) apply unchanged from one CPU to a pod.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medvl_jax.parallel import rules

MESH_AXES = ("data", "fsdp", "tensor")

RULES = rules.RULES  # Re-exported: the table lives in rules.py.


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``('data', 'fsdp', 'tensor')`` over ``devices`` (default: all).

    ``shape`` maps axis names to sizes, e.g. ``{"data": -1, "fsdp": 1, "tensor": 1}``; missing
    axes are 1 and one size may be -1 (= the rest). The sizes must multiply to the number of
    devices, or a ValueError says why not.
    """
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(shape)}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(shape)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    try:  # Topology-aware device order on TPU/GPU; plain order elsewhere.
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # noqa: BLE001 - any failure: fall back to the given order.
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the 'data' x 'fsdp' axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def global_batch_from_local(local_batch, mesh: Mesh, sharding: NamedSharding | None = None):
    """This process's part of the batch (a pytree of arrays with a leading batch axis) as
    global ``jax.Array``s split over the batch axes of ``mesh``.

    Every process passes its own rows (``global batch / process_count`` of them); on one
    process this is just a sharded device_put.
    """
    sharding = sharding or batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` only when the environment is multi-process.

    Multi-process means a coordinator address is set (``JAX_COORDINATOR_ADDRESS``, with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` for a local or hand-made launch), a SLURM job
    with several tasks, or a TPU pod slice with several workers. A single process does
    nothing. Returns whether the runtime is (now) distributed.
    """
    env = os.environ
    multi = ("JAX_COORDINATOR_ADDRESS" in env
             or int(env.get("SLURM_NTASKS", "1")) > 1
             or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
    if not multi:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if "JAX_NUM_PROCESSES" in env:
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True
