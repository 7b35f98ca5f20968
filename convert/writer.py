"""Streaming a checkpoint into an orbax checkpoint: validate, write tensor by tensor into a temporary directory,
rename at the end. A failure leaves nothing at the destination."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import orbax.checkpoint.experimental.v1 as ocp
from tqdm import tqdm

from tilert_jax.convert.hf import iter_hf_params, plan, resolve_dtype, target_dtypes
from tilert_jax.convert.safetensors_files import CheckpointError

FORMAT_FILE = "tilert_jax.json"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def _nested(path: str, array) -> dict:
    node: dict = {}
    root = node
    *parents, last = path.split("/")
    for part in parents:
        node[part] = {}
        node = node[part]
    node[last] = array
    return root


def convert(src: str | Path, dst: str | Path, dtype: str | None = None, progress: bool = True) -> Path:
    """Converts a Hugging Face directory at `src` into an orbax checkpoint directory at `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"destination {dst} already exists")
    config, pairs = plan(src)
    target = resolve_dtype(config, dtype)
    dtypes = target_dtypes(config, target)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        total = sum(entry.nbytes for _, entry in pairs)
        with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
            for (m, entry), (path, array) in zip(pairs, iter_hf_params(pairs, dtypes)):
                ocp.partial.save(tmp / PARAMS_DIR, _nested(path, array))
                bar.update(entry.nbytes)
        ocp.partial.finalize(tmp / PARAMS_DIR)
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        (tmp / FORMAT_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "dtype": str(target)}, indent=1))
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
