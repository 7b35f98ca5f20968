"""Writing this engine's parameters as a Hugging Face checkpoint (config.json + model.safetensors).

The layout knowledge lives in one place, convert/maps.py, which says how each Hugging Face tensor becomes ours
(`TensorMap.to_ours`). Every such transform only moves elements (transposes and reshapes), so it is inverted
exactly by pushing an array of flat Hugging Face indices through it: the result says, for each element of our
array, which Hugging Face element it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from tilert_jax.config import config_from_hf
from tilert_jax.convert.maps import TensorMap, tensor_map
from tilert_jax.params import leaf_paths


def to_hf_layout(m: TensorMap, ours: np.ndarray) -> np.ndarray:
    """Our array for map entry `m` -> the Hugging Face tensor (shape m.hf_shape) it is read from."""
    size = int(np.prod(m.hf_shape))
    source = m.to_ours(np.arange(size).reshape(m.hf_shape))  # our layout, holding Hugging Face flat indices
    if source.shape != ours.shape:
        raise ValueError(f"{m.path} has shape {list(ours.shape)}, expected {list(source.shape)} for {m.hf_name}")
    if np.unique(source).size != size:
        raise ValueError(f"the map of {m.hf_name} is not a permutation of its elements; it cannot be inverted")
    hf = np.empty(size, ours.dtype)
    hf[source.ravel()] = ours.ravel()
    return hf.reshape(m.hf_shape)


def hf_tensors(config, params, dtype=None) -> dict[str, np.ndarray]:
    """The Hugging Face tensors (name -> array, in `dtype` if given) of a parameter tree of `config`."""
    maps, _ = tensor_map(config)
    flat = dict(zip(leaf_paths(params), jax.tree.leaves(params)))
    out = {}
    for m in maps:
        array = np.asarray(jax.device_get(flat[m.path]))
        out[m.hf_name] = to_hf_layout(m, array if dtype is None else array.astype(dtype))
    return out


def save_hf_checkpoint(directory: str | Path, hf_config: dict, params, dtype: str | None = None) -> Path:
    """Writes `params` (a parameter tree of the model that `hf_config`, a config.json dict, describes) as
    config.json + model.safetensors in `directory`. dtype: "float32" | "bfloat16" | "float16" (default: the config's
    torch_dtype / dtype)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config_from_hf(hf_config)
    dtype = dtype or config.dtype
    hf_config = {**hf_config, "torch_dtype": dtype}
    hf_config.pop("dtype", None)
    tensors = hf_tensors(config, params, jax.numpy.dtype(dtype))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return directory
