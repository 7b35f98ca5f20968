"""tilert_jax.profiling on a hand-made trace: only GPU stream events count, busy time is the union of intervals."""

import pytest

from tilert_jax import profiling


def _trace():
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}}]
    events = [{"ph": "X", "pid": 2, "tid": 7, "ts": 0, "dur": 10, "name": "matvec"},
              {"ph": "X", "pid": 2, "tid": 7, "ts": 5, "dur": 10, "name": "matvec"},  # overlaps the first
              {"ph": "X", "pid": 2, "tid": 7, "ts": 30, "dur": 4, "name": "fusion_1"},
              {"ph": "X", "pid": 2, "tid": 8, "ts": 0, "dur": 99, "name": "an op line, not a kernel"},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 99, "name": "host work"}]
    return {"traceEvents": meta + events}


def test_summarize_counts_gpu_stream_kernels_per_step():
    summary = profiling.summarize(profiling.gpu_kernel_events(_trace()), steps=2, top=5)
    assert summary["span_us_per_step"] == 17.0  # 0 .. 34 over 2 steps
    assert summary["busy_us_per_step"] == 9.5  # [0, 15] and [30, 34]
    assert summary["gap_us_per_step"] == 7.5
    assert [(k["name"], k["us_per_step"], k["calls_per_step"]) for k in summary["kernels"]] == [
        ("matvec", 10.0, 1.0), ("fusion_1", 2.0, 0.5)]


def test_one_gpu_of_several():
    """On a mesh every device runs the same step: `gpu` keeps one device's kernels (GPU:1 is not GPU:10)."""
    trace = _trace()
    for pid, gpu in ((3, "1"), (4, "10")):
        trace["traceEvents"] += [
            {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"/device:GPU:{gpu}"}},
            {"ph": "M", "pid": pid, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
            {"ph": "X", "pid": pid, "tid": 7, "ts": 0, "dur": 3, "name": f"on_gpu_{gpu}"}]
    assert {e["name"] for e in profiling.gpu_kernel_events(trace, gpu=1)} == {"on_gpu_1"}
    assert len(profiling.gpu_kernel_events(trace)) == 5


def test_no_gpu_events_is_a_clear_error():
    trace = {"traceEvents": [e for e in _trace()["traceEvents"] if e.get("pid") == 1]}
    with pytest.raises(RuntimeError, match="no GPU stream events"):
        profiling.gpu_kernel_events(trace)


def test_hlo_ops_maps_fusion_names():
    hlo = ('  %input_concatenate_fusion.26 = bf16[576]{0} fusion(%a), kind=kInput, calls=%f, '
           'metadata={op_name="jit(decode)/while/body/concatenate" stack_frame_id=66}\n')
    assert profiling.hlo_ops(hlo) == {"input_concatenate_fusion_26": "jit(decode)/while/body/concatenate"}


@pytest.mark.gpu
def test_gpu_kernel_seconds_is_device_time():
    """A chain of 16 products, each reading its own 64 MB weight once: the kernel time is near the bytes over HBM's
    rate (2 to 12 TB/s brackets every H200 measurement) and below the wall time of the same call, which adds the
    host's dispatch."""
    import jax
    import jax.numpy as jnp

    ws = [jnp.full((4096, 8192), 1e-3 * (i + 1), jnp.bfloat16) for i in range(16)]
    x = jnp.ones((1, 4096), jnp.bfloat16)

    @jax.jit
    def run(x, ws):
        for w in ws:
            x = (x @ w)[:, :4096]
        return x

    seconds = profiling.kernel_seconds(lambda: run(x, ws))
    weight_bytes = sum(w.nbytes for w in ws)
    assert weight_bytes / 12e12 < seconds < weight_bytes / 2e12
    assert seconds < profiling.median_seconds(run, x, ws)
