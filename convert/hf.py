"""Reading a Hugging Face checkpoint directory as a stream of (parameter path, array), validated up front."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from tilert_jax.config import load_config
from tilert_jax.convert.maps import TensorMap, tensor_map
from tilert_jax.convert.safetensors_files import CheckpointError, StackedEntry, TensorEntry, index_checkpoint
from tilert_jax.models import family
from tilert_jax.params import is_spec, leaf_paths

import jax


def plan(directory: str | Path, config=None) -> tuple[object, list[tuple[TensorMap, TensorEntry]]]:
    """Checks everything before anything is read or written: every shard present and sound, every expected tensor
    present with the expected shape, nothing unexpected. Returns the config and (map, entry) pairs."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {directory}")
    config = config or load_config(directory)
    entries = index_checkpoint(directory)
    maps, ignored = tensor_map(config)
    pairs = match(maps, ignored, entries)
    specs = family(config).param_specs(config)
    assert sorted(m.path for m in maps) == sorted(leaf_paths(specs)), "the tensor map does not cover the params"
    return config, pairs


def _members(m) -> tuple[str, ...]:
    """The checkpoint tensors behind one map: itself, or the stacked `hf_names` (e.g. routed experts)."""
    return tuple(getattr(m, "hf_names", None) or (m.hf_name,))


def _is_ignored(name: str, ignored: set[str]) -> bool:
    """An exact ignored name, or a prefix written with a trailing '*'."""
    return name in ignored or any(p.endswith("*") and name.startswith(p[:-1]) for p in ignored)


def match(maps, ignored: set[str], entries: dict[str, TensorEntry], check_unexpected: bool = True):
    """(map, entry) pairs after checking: every expected tensor present with the expected shape (and, where a map
    names them in `hf_dtypes`, an allowed dtype), nothing unexpected. A map with `hf_names` gets one StackedEntry."""
    missing = [n for m in maps for n in _members(m) if n not in entries]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                                  else ""))
    for m in maps:
        for name in _members(m):
            if entries[name].shape != m.hf_shape:
                raise CheckpointError(f"tensor {name} has shape {list(entries[name].shape)}, expected "
                                      f"{list(m.hf_shape)} from config.json")
            allowed = getattr(m, "hf_dtypes", None)
            if allowed and entries[name].dtype not in allowed:
                raise CheckpointError(f"tensor {name} has dtype {entries[name].dtype}, expected "
                                      f"{' or '.join(allowed)} from config.json")
    if check_unexpected:
        known = {n for m in maps for n in _members(m)}
        unexpected = sorted(n for n in set(entries) - known if not _is_ignored(n, ignored))
        if unexpected:
            raise CheckpointError(f"unexpected tensor {unexpected[0]}" + (f" and {len(unexpected) - 1} more"
                                                                           if len(unexpected) > 1 else ""))
    return [(m, entries[m.hf_name] if getattr(m, "hf_names", None) is None
             else StackedEntry(tuple(entries[n] for n in m.hf_names))) for m in maps]


def target_dtypes(config, dtype) -> dict[str, np.dtype]:
    """Per parameter path, the dtype it is stored in: `dtype` unless the spec fixes one (FP8 weights, scales)."""
    specs = family(config).param_specs(config)
    flat = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)[0]
    return {name: np.dtype(spec.resolved_dtype(dtype)) for name, spec in zip(leaf_paths(specs), flat)}


def iter_hf_params(pairs: list[tuple[TensorMap, TensorEntry]], dtypes: dict[str, np.dtype]
                   ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (path, array) one tensor at a time, in our layout and dtype."""
    for m, entry in pairs:
        array = m.to_ours(entry.read())
        yield m.path, array.astype(dtypes[m.path], copy=False)


def resolve_dtype(config, dtype: str | None):
    return jnp.dtype(dtype or config.dtype)
