"""The one table from logical parameter axes to mesh axes. Every PartitionSpec in the project comes from it."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tilert_jax.params import ParamSpec, is_spec

RULES: dict[str, str | None] = {
    "vocab": "tp",  # embedding rows and lm_head columns: each device holds a slice of the vocabulary
    "embed": None,  # the hidden vector is replicated at batch 1
    "heads": "tp",
    "kv_heads": "tp",  # replicated instead when the mesh is wider than the number of KV heads
    "head_dim": None,
    "mlp": "tp",
    "experts": "ep",
    "expert_mlp": "tp",
    "q_lora": None,
    "kv_lora": None,
}


def partition_spec(spec: ParamSpec, mesh: Mesh) -> PartitionSpec:
    """Each logical axis mapped by RULES; an axis that the mesh axis does not divide stays replicated."""
    parts = []
    for size, axis in zip(spec.shape, spec.axes):
        mesh_axis = RULES.get(axis) if axis else None
        if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or size % mesh.shape[mesh_axis]):
            mesh_axis = None
        parts.append(mesh_axis)
    return PartitionSpec(*parts)


def shard_count(spec: ParamSpec, mesh: Mesh) -> int:
    """How many shards `partition_spec` cuts the parameter into (the devices of the other mesh axes hold copies)."""
    count = 1
    for mesh_axis in partition_spec(spec, mesh):
        count *= mesh.shape[mesh_axis] if mesh_axis else 1
    return count


def param_shardings(specs, mesh: Mesh):
    """NamedShardings with the tree structure of `specs`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, partition_spec(s, mesh)), specs, is_leaf=is_spec)


def param_partition_specs(specs, mesh: Mesh):
    return jax.tree.map(lambda s: partition_spec(s, mesh), specs, is_leaf=is_spec)
