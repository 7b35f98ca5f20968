"""The bench CLI on the CPU: the `tiny` preset through `python -m tilert_jax.bench`, both implementations."""

import json
import os
import subprocess
import sys
from pathlib import Path

KEYS = {"preset", "ttft_ms", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "weight_bytes", "achieved_gbps",
        "floor_ms", "frac_of_floor", "device", "copy_gbps", "batch", "impl", "jax"}


def test_bench_tiny_cli():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "tilert_jax.bench", "--preset", "tiny", "--random-weights", "--prompt-len", "40",
           "--new-tokens", "9", "--chunk", "4", "--repeats", "1", "--ttft-repeats", "1", "--impl", "xla,pallas",
           "--batch", "1,2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["impl"], r["batch"]) for r in rows] == [("xla", 1), ("pallas", 1), ("xla", 2), ("pallas", 2)]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["preset"] == "tiny" and r["weight_bytes"] > 0 and r["tpot_ms_p50"] > 0
        assert abs(r["frac_of_floor"] - r["floor_ms"] / r["tpot_ms_p50"]) < 1e-9
        assert r["tpot_ms_p50"] <= r["tpot_ms_p90"] <= r["tpot_ms_p99"]
    # Same random weights, greedy: the fused Pallas decode (interpreted here) picks the same tokens.
    assert rows[1]["tokens_match_xla"] == 1.0 and rows[3]["tokens_match_xla"] == 1.0


def test_bench_requires_random_weights():
    out = subprocess.run([sys.executable, "-m", "tilert_jax.bench", "--preset", "tiny"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode != 0 and "--random-weights" in out.stderr
