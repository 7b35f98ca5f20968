"""Two processes on this machine (4 CPU devices each) form one 8-device mesh through jax.distributed and give the
single-process logits."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import tilert_jax
from tilert_jax.convert import convert


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_one_mesh(hf_checkpoint, tmp_path):
    checkpoint = convert(hf_checkpoint("llama_8heads", True, False)[1], tmp_path / "ckpt", progress=False)
    prompt = np.random.default_rng(3).integers(0, 160, (1, 16))
    np.save(tmp_path / "prompt.npy", prompt)
    expected = np.asarray(tilert_jax.load(checkpoint).logits(prompt))

    worker = Path(__file__).with_name("multihost_worker.py")
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), port, str(checkpoint), str(tmp_path / "prompt.npy"),
                               str(tmp_path / f"logits{i}.npy")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    for i in range(2):
        logits = np.load(tmp_path / f"logits{i}.npy")
        assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
