"""Parameter trees described once.

A model family returns its parameter tree with a `ParamSpec` at every leaf (shape, logical axes, initialiser).
Random initialisation, abstract shapes (for orbax restore and AOT compilation) and shardings are all derived from
that one description, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # one logical axis name per dimension (sharding/rules.py maps them to the mesh)
    init: str = "normal"  # "normal" (std 0.02), "ones" or "zeros"
    dtype: str | None = None  # None: the model's parameter dtype; else fixed (e.g. a float32 router bias)

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec shape {self.shape} and axes {self.axes} differ in rank")

    def resolved_dtype(self, dtype) -> jnp.dtype:
        return jnp.dtype(self.dtype) if self.dtype is not None else jnp.dtype(dtype)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs: Any) -> Any:
    return jax.tree.map(fn, specs, is_leaf=is_spec)


def init_params(specs: Any, key: jax.Array, dtype=jnp.bfloat16, std: float = 0.02, shardings: Any = None) -> Any:
    """Random parameters with the tree structure of `specs` (the bench and the tests use these).

    Leaf by leaf, each drawn in float32 and cast, so one leaf's float32 temporary is the most memory it takes beyond
    the result; with `shardings` each leaf is drawn directly into its shards."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    placements = [None] * len(leaves) if shardings is None else treedef.flatten_up_to(shardings)
    return jax.tree.unflatten(treedef, [_init_leaf(spec, jnp.dtype(dtype), std, sharding)(k)
                                        for spec, k, sharding in zip(leaves, keys, placements)])


@functools.lru_cache(maxsize=None)
def _init_leaf(spec: ParamSpec, dtype, std: float, sharding) -> Callable[[jax.Array], jax.Array]:
    out_dtype = spec.resolved_dtype(dtype)

    def draw(k: jax.Array) -> jax.Array:
        if spec.init == "ones":
            return jnp.ones(spec.shape, out_dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, out_dtype)
        return (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(out_dtype)

    return jax.jit(draw, out_shardings=sharding)


def abstract_params(specs: Any, dtype=jnp.bfloat16, shardings: Any = None) -> Any:
    """jax.ShapeDtypeStruct leaves (with shardings when given): the target of a restore or an AOT compile."""
    if shardings is None:
        return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, s.resolved_dtype(dtype)), specs)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.resolved_dtype(dtype), sharding=sh),
                        specs, shardings, is_leaf=is_spec)


def param_bytes(specs: Any, dtype=jnp.bfloat16, shards: Callable[[ParamSpec], int] | None = None) -> int:
    """The bytes of the parameters `specs` describe; with `shards` (spec -> the number of devices that divide it, as
    sharding.shard_count gives for a mesh), the bytes one device holds."""
    leaves = jax.tree.leaves(specs, is_leaf=is_spec)
    return sum(int(np.prod(s.shape)) * s.resolved_dtype(dtype).itemsize // (shards(s) if shards else 1)
               for s in leaves)


def layer_run(params: Any, layers: slice) -> Any:
    """A model's parameters (or their specs or shardings) with only the layers `layers` selects in params.layers; the
    embedding, final norm and LM head kept (a program that does not read them drops them)."""
    return dataclasses.replace(params, layers=params.layers[layers])


def leaf_paths(tree: Any) -> list[str]:
    """'layers/3/attn/wq'-style names of every leaf, in flatten order: the names stored in a checkpoint."""
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]]


def path_name(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def to_nested_dict(tree: Any) -> dict:
    """The storage form of a parameter tree: nested dicts keyed by the parts of each leaf's path name."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)[0]:
        node = out
        *parents, last = path_name(path).split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return out


def from_nested_dict(template: Any, nested: dict) -> Any:
    """Inverse of `to_nested_dict`: leaves of `nested` put into the structure of `template`."""
    leaves = []
    for name in leaf_paths(template):
        node = nested
        for part in name.split("/"):
            node = node[part]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(template, is_leaf=is_spec), leaves)
