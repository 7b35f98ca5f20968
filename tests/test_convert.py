"""The converter: a good checkpoint converts; every kind of bad one exits non-zero with one line and leaves nothing."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tilert_jax


def run_convert(src, dst, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "tilert_jax.convert", "--src", str(src), "--dst", str(dst),
                           "--no-progress", *extra], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def sharded_copy(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("qwen2", True, False)
    copy = tmp_path / "src"
    shutil.copytree(directory, copy)
    return copy


def test_cli_converts_and_copies_side_files(sharded_copy, tmp_path):
    (sharded_copy / "generation_config.json").write_text("{}")
    dst = tmp_path / "out"
    result = run_convert(sharded_copy, dst, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert (dst / "config.json").is_file() and (dst / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary directory left
    model = tilert_jax.load(dst)
    assert model.params.embed.dtype == np.dtype("bfloat16")


def _shard_names(directory):
    return sorted(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _break_missing_shard(src):
    (src / _shard_names(src)[1]).unlink()
    return _shard_names(src)[1]


def _break_truncated_shard(src):
    shard = src / _shard_names(src)[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name


def _break_model_type(src):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt_bigcode"
    (src / "config.json").write_text(json.dumps(config))
    return "gpt_bigcode"


def _break_missing_config(src):
    (src / "config.json").unlink()
    return "config.json"


def _break_shape(src):
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] += 8
    (src / "config.json").write_text(json.dumps(config))
    return "expected"


@pytest.mark.parametrize("breakage", [_break_missing_shard, _break_truncated_shard, _break_model_type,
                                      _break_missing_config, _break_shape])
def test_bad_checkpoint_fails_cleanly(sharded_copy, tmp_path, breakage):
    named = breakage(sharded_copy)
    dst = tmp_path / "out"
    result = run_convert(sharded_copy, dst)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial output beside the destination either


def test_unexpected_tensor_is_refused(hf_checkpoint, tmp_path):
    from safetensors.numpy import save_file

    _, directory = hf_checkpoint("qwen3", False, True)
    src = tmp_path / "src"
    shutil.copytree(directory, src)
    save_file({"model.extra.weight": np.zeros(3, np.float32)}, str(src / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor model.extra.weight"):
        tilert_jax.convert.convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_refused(sharded_copy, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    result = run_convert(sharded_copy, dst)
    assert result.returncode != 0 and "already exists" in result.stderr
