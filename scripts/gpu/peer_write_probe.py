"""Whether a Triton kernel on one GPU can store into another GPU's buffer of the same process: the mechanism an
all-reduce inside a producing kernel needs (issue 6: peer writes over NVLink, no NCCL launch).

    python3 -m pip install --no-deps jax_triton-0.3.1-py3-none-any.whl   # not in the GPU image: carry the wheel
    python3 scripts/gpu/peer_write_probe.py            # on nvidia-h200-x2 or larger

Steps, each printed: whether the CUDA runtime reports peer access between devices 0 and 1 (and whether XLA already
enabled it in this process: cudaDeviceEnablePeerAccess then answers "already enabled"); then a jax-triton kernel on
device 0 that reads a raw device-1 address from its input (`unsafe_buffer_pointer`) and stores through it; then
device 1's buffer read back. A kernel that faults ends the process (a sticky CUDA error): the last line printed says
how far it got.
"""

from __future__ import annotations

import ctypes
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

N = 256


@triton.jit
def _store_through(addr_ref, x_ref, out_ref, n: tl.constexpr):
    i = tl.arange(0, n)
    dst = tl.load(addr_ref).to(tl.pointer_type(tl.float32))  # another device's buffer, its address given as data
    x = tl.load(x_ref + i)
    tl.store(dst + i, x * 2.0)
    tl.store(out_ref + i, x)


def _cudart():
    """The CUDA runtime library the GPU image ships (through its nvidia-* wheels), or None."""
    import nvidia

    roots = [os.path.dirname(p) for p in nvidia.__path__]
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", "libcudart.so*"), recursive=True)):
            return ctypes.CDLL(path)
    return None


def main() -> int:
    import jax_triton as jt

    devices = jax.devices()
    print("devices", devices, flush=True)
    if len(devices) < 2:
        print("needs two GPUs")
        return 1
    rt = _cudart()
    if rt is not None:
        can = ctypes.c_int(-1)
        rt.cudaDeviceCanAccessPeer(ctypes.byref(can), 0, 1)
        rt.cudaSetDevice(0)
        enabled = rt.cudaDeviceEnablePeerAccess(1, 0)
        print("can access peer 0->1:", can.value, "| cudaDeviceEnablePeerAccess(1):", enabled,
              "(0 enabled now, 704 already enabled)", flush=True)
        rt.cudaGetLastError()  # clear the runtime's error state, which XLA's next CUDA call would otherwise report
    target = jax.device_put(jnp.zeros((N,), jnp.float32), devices[1])
    target.block_until_ready()
    jax.config.update("jax_enable_x64", True)
    addr = jax.device_put(jnp.array([target.unsafe_buffer_pointer()], jnp.int64), devices[0])
    x = jax.device_put(jnp.arange(N, dtype=jnp.float32), devices[0])
    print("storing from device 0 into device 1's buffer ...", flush=True)
    out = jt.triton_call(addr, x, kernel=_store_through, out_shape=jax.ShapeDtypeStruct((N,), jnp.float32),
                         grid=(1,), n=N)
    out.block_until_ready()
    got = np.asarray(target)
    print("kernel ran; device 1 holds the stored values:", bool(np.all(got == 2 * np.arange(N))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
