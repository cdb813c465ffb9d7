"""From the config's mesh and logical-axis rules to concrete shardings. The model never sees a mesh.

The model names the axes of its parameters and activations logically ("embed", "mlp", ...).
This module alone turns those names into `NamedSharding`s on a (data, fsdp, tensor) mesh:
parameters and optimizer state from their logical partition specs, the batch along "batch".
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esm3_jax.train.config import MESH_AXES, MeshConfig

log = logging.getLogger(__name__)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    Auto axis types: shardings come from the in/out shardings and the model's logical
    constraints, and XLA's partitioner propagates them (jax.make_mesh would otherwise default
    to explicit sharding).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def mesh_summary(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.devices.size} devices)"


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules):
    """Trace-time context: the mesh and the logical rules the model's constraints resolve against."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _fit_spec(mesh_spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
    """Drop the mesh axes of a dimension they do not divide (e.g. the 11 SS8 logits on tensor=2),
    and any mesh axis already used by an earlier dimension: such a dimension is replicated."""
    used: set[str] = set()
    out = []
    for dim, axes in enumerate(tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))):
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        size = int(np.prod([mesh.shape[a] for a in axes_t])) if axes_t else 1
        if axes_t and shape[dim] % size:
            log.info("%s: dim %d of size %d is not divisible by mesh axes %s; replicated", where, dim, shape[dim], axes_t)
            axes_t = ()
        used.update(axes_t)
        out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_to_shardings(logical_specs, abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a tree, given its logical PartitionSpecs (from nn.get_partition_spec)
    and its abstract values (for the shapes)."""

    def one(path, spec, leaf):
        if not hasattr(leaf, "shape"):
            # An empty placeholder such as optax's MaskedNode (a frozen parameter's missing
            # optimizer state): no array to place; kept so the tree matches the state's.
            return leaf
        where = jax.tree_util.keystr(path)
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
        return NamedSharding(mesh, _fit_spec(mesh_spec, tuple(leaf.shape), mesh, where))

    return jax.tree_util.tree_map_with_path(
        one, logical_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P) or x is None
    )


def batch_spec(rules, ndim: int) -> P:
    """Split the leading (batch) dimension along the mesh axes the "batch" logical axis maps to."""
    return nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)


def batch_shardings(batch_like: Mapping[str, Any], mesh: Mesh, rules) -> dict[str, NamedSharding]:
    """One NamedSharding per batch key (every key's leading dimension is the batch)."""
    return {k: NamedSharding(mesh, batch_spec(rules, np.ndim(v))) for k, v in batch_like.items()}


def global_batch(local_batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
                 global_rows: int) -> dict[str, jax.Array]:
    """Assemble the global batch from each process's own rows (its slice of the global batch)."""
    out = {}
    for k, v in local_batch.items():
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, (global_rows,) + v.shape[1:])
    return out
