"""The logical-axis rules: which mesh axis each named parameter/activation dimension uses.

Models name their dimensions (``nn.with_logical_partitioning(init, ("embed", "mlp"))``,
``nn.with_logical_constraint(x, ("batch", "length", "embed"))``); this table maps those names
onto the mesh axes ``('data', 'fsdp', 'tensor')``. A name missing from the table, or mapped to
None, is replicated. Changing the parallelism layout of every model is one edit here.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# Logical name -> mesh axis (or axes). Weights are split over 'fsdp' along their model width
# (ZeRO-3 style) and over 'tensor' along heads/mlp/vocab (Megatron style); the batch is split
# over 'data' x 'fsdp'.
RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_length", None),
)


def rules_dict(rules=RULES) -> dict[str, MeshAxes]:
    """The rules as a dict (logical name -> mesh axes)."""
    return dict(rules)


def logical_to_spec(names: tuple[str | None, ...], rules=RULES) -> PartitionSpec:
    """The PartitionSpec of one array whose dimensions carry these logical names."""
    return nn.logical_to_mesh_axes(names, rules)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for a pytree whose leaves may be ``nn.LogicallyPartitioned`` boxes
    (e.g. the output of ``jax.eval_shape(model.init, ...)``). Unboxed leaves are replicated.

    The result has the structure of the *unboxed* tree (one NamedSharding per array).
    """
    specs = nn.get_partition_spec(boxed_tree)  # Logical names, or PartitionSpec() if unboxed.
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that puts a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=RULES) -> Iterator[None]:
    """Context under which ``nn.with_logical_constraint`` in models resolves against ``mesh``.

    Trace (jit) the model's step inside this context so its activation constraints apply.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
