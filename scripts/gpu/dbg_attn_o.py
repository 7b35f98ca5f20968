"""Debug: the attention launch with its output projection at the 1B shape, on the GPU, per column tile."""
import sys, jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from tilert_jax.kernels import decode_attention as da

def atomic_wait(counter_ref, index, interpret):
    index = jnp.asarray(index, jnp.int32)
    lax.while_loop(lambda seen: seen < 1, lambda _: plt.atomic_add(counter_ref, index, jnp.int32(0)),
                   plt.atomic_add(counter_ref, index, jnp.int32(0)))
    plt.debug_barrier()
    plt.atomic_add(counter_ref, index, jnp.int32(-1))
    plt.debug_barrier()

B, n, kvh, d, L, N, splits = 1, 32, 8, 64, 1280, 2048, 16
if len(sys.argv) > 2: B, n, kvh, d, L, N, splits = map(int, sys.argv[2:])
mode = sys.argv[1]
if mode == "atomic": da.wait_and_release = atomic_wait
bf, f32 = jnp.bfloat16, jnp.float32
ks = jax.random.split(jax.random.key(0), 8)
qkv = jax.random.normal(ks[0], (B, n + 2 * kvh, d), f32).astype(bf)
kc = jax.random.normal(ks[1], (B, kvh, L, d), f32).astype(bf)
vc = jax.random.normal(ks[2], (B, kvh, L, d), f32).astype(bf)
ang = jax.random.uniform(ks[3], (d // 2,), f32, 0, 6.0); ang = jnp.concatenate([ang, ang])
cos, sin = jnp.cos(ang).astype(bf), jnp.sin(ang).astype(bf)
wo = (jax.random.normal(ks[4], (N, n * d), f32) / np.sqrt(n * d)).astype(bf)
x = jax.random.normal(ks[5], (B, N), f32).astype(bf)
kw = dict(num_heads=n, num_kv_heads=kvh, scale=d ** -0.5)
pos = jnp.int32(1100)
ref = da.decode_attention_reference(qkv, kc, vc, pos, cos, sin, **kw, wo=wo, residual=x)[0].astype(f32)
ref_out = da.decode_attention_reference(qkv, kc, vc, pos, cos, sin, **kw)[0].astype(f32)
out0 = da.decode_attention(qkv, kc, vc, pos, cos, sin, **kw, splits=splits, block=64)[0].astype(f32)
print("attention alone rel", float(jnp.linalg.norm(out0 - ref_out) / jnp.linalg.norm(ref_out)))
f = jax.jit(lambda: da.decode_attention(qkv, kc, vc, pos, cos, sin, **kw, splits=splits, block=64, wo=wo, residual=x))
for rep in range(3):
    y, _, _, cnt = f()
    y = y.astype(f32)
    err = np.asarray(jnp.abs(y - ref).reshape(B, N // 32, 32).max(axis=(0, 2)))
    print(mode, "rep", rep, "rel", float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)), "bad tiles",
          np.nonzero(err > 0.1)[0][:20], "nonzero counters", np.nonzero(np.asarray(cnt))[0][:10], np.asarray(cnt)[np.nonzero(np.asarray(cnt))[0][:10]])
print("x vs ref (zero proj?)", float(jnp.linalg.norm(x.astype(f32) - ref) / jnp.linalg.norm(ref)))
