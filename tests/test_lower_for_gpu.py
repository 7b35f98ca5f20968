"""The fused decode step lowers for an H200 on the CPU (scripts/lower_for_gpu.py: a fake Hopper device, then JAX's
lowering of the Mosaic GPU and Triton kernels, Mosaic GPU's layout inference included), so a kernel change that
cannot lower fails here rather than on the GPU machine. In a subprocess: the fake device must not reach other tests."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "lower_for_gpu.py"


@pytest.mark.parametrize("args,kernels", [
    (["--preset", "llama-3.2-1b"], ["decode_attention x2", "layer_decode x2"]),  # the layer's weights in one launch
    (["--preset", "llama-3.1-8b"], ["decode_attention x2", "layer_decode x2"]),
    (["--preset", "llama-3.2-1b", "--ops", "all"], ["decode_attention x1", "layer_decode x2"]),  # stream_attention
    (["--preset", "llama-3.2-1b", "--batch", "4"], ["decode_attention x2", "matvec x2"]),  # no layer launch
    (["--preset", "llama-3.1-8b", "--batch", "8", "--ops", "attention,gate_up,qkv_norm,mlp_norm"],
     ["stream_norm x5"]),  # the norms as launches
], ids=["1b", "8b", "1b-all-ops", "1b-batch4", "8b-batch8-norm"])
def test_decode_step_lowers_for_hopper(args, kernels):
    run = subprocess.run([sys.executable, str(SCRIPT), "--layers", "2", *args], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "lowered for cuda" in run.stdout
    for kernel in kernels:
        assert kernel in run.stdout, run.stdout
