"""Loading parameters onto devices, from a converted (orbax) directory or a raw Hugging Face one."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint.experimental.v1 as ocp
from tqdm import tqdm

from tilert_jax.convert.hf import iter_hf_params, plan, target_dtypes
from tilert_jax.convert.writer import FORMAT_FILE, PARAMS_DIR
from tilert_jax.models import family
from tilert_jax.params import abstract_params, from_nested_dict, leaf_paths, to_nested_dict


def is_converted(directory: Path) -> bool:
    return (directory / FORMAT_FILE).is_file()


def default_dtype(directory: Path, config) -> jnp.dtype:
    """The dtype a converted checkpoint was written in, else the one its config.json declares."""
    if is_converted(directory):
        return jnp.dtype(json.loads((directory / FORMAT_FILE).read_text())["dtype"])
    return jnp.dtype(config.dtype)


def _default_shardings(specs):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, specs, is_leaf=lambda x: hasattr(x, "axes"))


def load_params(directory: Path, config, dtype, shardings=None, progress: bool = False):
    """The parameter tree of `config`'s family in `dtype`, each leaf placed with its sharding (one device if None).

    Nothing is assembled whole on one device: orbax restores each leaf into its shards, and a raw checkpoint is
    streamed tensor by tensor.
    """
    specs = family(config).param_specs(config)
    shardings = shardings if shardings is not None else _default_shardings(specs)
    abstract = abstract_params(specs, dtype, shardings)
    if is_converted(directory):
        restored = ocp.load(directory / PARAMS_DIR, to_nested_dict(abstract))
        params = from_nested_dict(abstract, restored)
        if default_dtype(directory, config) != jnp.dtype(dtype):  # orbax restores the stored dtype; cast on device
            params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, abstract)
        return params
    _, pairs = plan(directory, config)
    placed = {}
    flat_abstract = dict(zip(leaf_paths(abstract), jax.tree.leaves(abstract)))
    stream = iter_hf_params(pairs, target_dtypes(config, dtype))
    for path, array in tqdm(stream, total=len(pairs), desc="loading", unit="tensor", disable=not progress):
        placed[path] = jax.device_put(array, flat_abstract[path].sharding)
    return jax.tree.unflatten(jax.tree.structure(abstract), [placed[p] for p in leaf_paths(abstract)])
