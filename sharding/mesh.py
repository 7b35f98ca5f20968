"""make_mesh(tp=..., ep=...): the device mesh every sharded function runs over."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("ep", "tp")  # experts across the outer axis, tensor parallelism inside it (neighbouring devices)


def make_mesh(tp: int = 1, ep: int = 1, devices=None) -> Mesh:
    """A mesh of ep x tp devices (the first ep * tp of `devices`, default all of jax.devices())."""
    if tp < 1 or ep < 1:
        raise ValueError(f"tp and ep must be >= 1, got tp={tp}, ep={ep}")
    devices = list(jax.devices() if devices is None else devices)
    if tp * ep > len(devices):
        raise ValueError(f"a mesh of tp={tp} x ep={ep} needs {tp * ep} devices, only {len(devices)} are present")
    return Mesh(np.array(devices[: tp * ep]).reshape(ep, tp), AXES)
