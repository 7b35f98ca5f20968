"""The tensors of a safetensors checkpoint (one file, or shards listed by model.safetensors.index.json).

Headers are validated with the `safetensors` library (a sound header, a file that covers every tensor). Tensors are
read by offset into a fresh array one at a time: safetensors' numpy backend cannot return float8 (numpy has no such
type), and reading by offset keeps host memory at one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    def read(self) -> np.ndarray:
        count = self.nbytes // np.dtype(DTYPES[self.dtype]).itemsize
        return np.fromfile(self.file, dtype=DTYPES[self.dtype], count=count, offset=self.offset).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class StackedEntry:
    """Several same-shape tensors read as one, stacked along a new leading axis (a model's routed experts)."""

    entries: tuple[TensorEntry, ...]

    @property
    def name(self) -> str:
        return self.entries[0].name

    @property
    def dtype(self) -> str:
        return self.entries[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.entries), *self.entries[0].shape)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def read(self) -> np.ndarray:
        out = np.empty(self.shape, DTYPES[self.dtype])
        for i, entry in enumerate(self.entries):
            out[i] = entry.read()
        return out


def shard_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index.name} is not a valid safetensors index ({e})") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {directory}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"missing shard {f.name} (listed in {INDEX_FILE})")
    return files


def read_header(file: Path) -> dict[str, TensorEntry]:
    try:
        with safe_open(str(file), framework="numpy"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"corrupt or truncated shard {file.name}: {e}") from None
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"tensor {name} in {file.name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        entries[name] = TensorEntry(name, file, info["dtype"], tuple(info["shape"]), 8 + header_len + start,
                                    end - start)
    return entries


def index_checkpoint(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name, after checking that every shard is present and sound."""
    entries: dict[str, TensorEntry] = {}
    for file in shard_files(directory):
        for name, entry in read_header(file).items():
            if name in entries:
                raise CheckpointError(f"tensor {name} appears in both {entries[name].file.name} and {file.name}")
            entries[name] = entry
    return entries
