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


# ---------------------------------------------------------------------------------------------
# Multi-process start-up
# ---------------------------------------------------------------------------------------------

# MEDVL_JAX_DISTRIBUTED=1 asks for jax.distributed with JAX's own cluster detection (what the
# TPU pod launcher sets: JAX then reads the worker list from the TPU VM's metadata); =0 forces
# a single process whatever else the environment says.
DISTRIBUTED_ENV = "MEDVL_JAX_DISTRIBUTED"


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def distributed_init_args(env: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for ``jax.distributed.initialize`` that ``env`` (default:
    ``os.environ``) asks for, or None when it describes a single process.

    In order of precedence:

    * ``MEDVL_JAX_DISTRIBUTED=0``: a single process.
    * ``JAX_COORDINATOR_ADDRESS`` (``host:port``) with ``JAX_NUM_PROCESSES`` and
      ``JAX_PROCESS_ID``: an explicit job (what ``launch/local.py`` sets). Inside a SLURM step
      the last two may be left to SLURM.
    * A SLURM job step (started by ``srun``: ``SLURM_STEP_NODELIST`` is set) of more than one
      task. The batch script itself (no step) is one process even when the job has several
      tasks, so running the trainer there directly does not wait for peers forever.
    * ``MEDVL_JAX_DISTRIBUTED=1`` (TPU pod launcher), a GKE TPU slice of several hosts
      (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES``) or a multislice job
      (``MEGASCALE_COORDINATOR_ADDRESS``): JAX's cluster detection fills in everything.

    ``JAX_LOCAL_DEVICE_IDS`` (comma-separated) restricts the devices of each process; the SLURM
    launcher sets it when one process drives all GPUs of its node, since JAX's SLURM detection
    would otherwise give each process only the GPU numbered by its local task id.
    """
    env = os.environ if env is None else env
    flag = env.get(DISTRIBUTED_ENV, "").strip().lower()
    if flag in ("0", "false", "no"):
        return None
    if flag not in ("", "1", "true", "yes"):
        raise ValueError(f"{DISTRIBUTED_ENV}={env[DISTRIBUTED_ENV]!r}: use 1 (initialise "
                         f"jax.distributed) or 0 (a single process)")
    kwargs: dict = {}
    if env.get("JAX_LOCAL_DEVICE_IDS"):
        try:
            kwargs["local_device_ids"] = [int(x) for x in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
        except ValueError:
            raise ValueError(f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']!r} is not a "
                             f"comma-separated list of integers") from None
    slurm_step = "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env
    slurm_tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env \
        else _int_env(env, "SLURM_NTASKS") if "SLURM_NTASKS" in env else 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in env]
        if missing and not slurm_step:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not: a multi-process "
                             f"job needs the number of processes and this process's id")
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = _int_env(env, "JAX_NUM_PROCESSES")
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = _int_env(env, "JAX_PROCESS_ID")
        n, i = kwargs.get("num_processes"), kwargs.get("process_id")
        if n is not None and i is not None and not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n})")
        if n == 1:
            return None
        return kwargs
    if slurm_step:
        if slurm_tasks == 1:
            return None
        return {**kwargs, "cluster_detection_method": "slurm"}
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if flag in ("1", "true", "yes") or len(hosts.split(",")) > 1 \
            or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return kwargs
    return None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` only when the environment describes a
    multi-process job (see :func:`distributed_init_args`); a single process does nothing.
    Call it before any other JAX call. Returns whether the runtime is (now) distributed.

    On CPU the cross-process collectives use gloo unless
    ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` says otherwise.
    """
    env = os.environ if env is None else env
    kwargs = distributed_init_args(env)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} of {jax.device_count()} devices here", flush=True)
    return True
