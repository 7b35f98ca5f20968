"""The matrix-vector kernel family against its jnp references: interpreted on the CPU (small shapes), compiled on a
GPU (`gpu` marker, real model shapes). Weights are [N, K] (torch's Linear layout) throughout.

Tolerances, as ||out - ref|| / ||ref|| against a float32 reference computed on the same (bf16-representable) inputs:
- float32 results (split-K partial sums, logits): 1e-5. Products of bf16 values are exact in float32; only the order
  of the float32 additions differs (relative error ~1e-7 * sqrt(K)).
- bf16 results: 1e-2. The output is rounded once to bf16 (2^-9 relative) and the fused prologues round the
  normalised input to bf16 as the reference does, where a one-ulp difference in an intermediate can move a result by
  2^-8; the norm over many elements lands well under 1e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import ops
from tilert_jax.kernels.matvec import MatvecConfig, combine_reference, fused_matvec, matvec, matvec_reference
from tilert_jax.kernels.matvec_residual import matvec_residual, matvec_residual_reference
from tilert_jax.kernels.norm_matvec import norm_matvec, norm_matvec_reference
from tilert_jax.kernels.swiglu_matvec import swiglu_matvec, swiglu_matvec_reference

BF16 = jnp.bfloat16
F32 = jnp.float32


def rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def up(*xs):
    return [None if x is None else x.astype(F32) for x in xs]


def rand(key, shape, dtype=BF16, scale=1.0):
    return (scale * jax.random.normal(key, shape, F32)).astype(dtype)


def fresh(n):
    return jax.random.split(jax.random.key(np.random.randint(1 << 30)), n)


@pytest.mark.parametrize("batch,cfg", [
    (1, MatvecConfig(bn=32, bk=32)),
    (3, MatvecConfig(bn=64, bk=64, split=2)),
    (1, MatvecConfig(bn=32, bk=64, mode="fma")),
    (1, MatvecConfig(bn=64, bk=32, split=2, mode="fma")),
    (2, MatvecConfig(bn=32, bk=128)),  # one K step: loop-free
])
def test_matvec(batch, cfg):
    k = fresh(2)
    x, w = rand(k[0], (batch, 128)), rand(k[1], (256, 128), scale=0.05)
    out = matvec(x, w, config=cfg)
    ref = matvec_reference(*up(x, w), out_dtype=F32)
    if cfg.split > 1:
        assert out.shape == (cfg.split, batch, 256) and out.dtype == F32
        assert rel(out.sum(0), ref) < 1e-5
    else:
        assert out.shape == (batch, 256) and out.dtype == BF16
        assert rel(out, ref) < 1e-2


@pytest.mark.parametrize("batch,cfg", [
    (2, MatvecConfig(bn=32, bk=32)),
    (1, MatvecConfig(bn=32, bk=64, split=2)),  # one K step per program: the loop-free form
    (3, MatvecConfig(bn=64, bk=128)),  # loop-free, whole rows
])
def test_norm_matvec_three_weights_with_parts(batch, cfg):
    k = fresh(6)
    hid = 128
    x, parts = rand(k[0], (batch, hid)), rand(k[1], (3, batch, hid), F32)
    nw = 1 + rand(k[2], (hid,), scale=0.1)
    ws = (rand(k[3], (128, hid), scale=0.05), rand(k[4], (64, hid), scale=0.05), rand(k[5], (64, hid), scale=0.05))
    out, x_new = norm_matvec(x, nw, 1e-5, ws, x_parts=parts, config=cfg)
    if cfg.split > 1:
        assert out.shape == (cfg.split, batch, 256) and out.dtype == F32
        out = out.sum(0)
    ref, ref_x = norm_matvec_reference(x, nw, 1e-5, ws, x_parts=parts)
    ref32 = norm_matvec_reference(ref_x.astype(F32), nw.astype(F32), 1e-5, tuple(w.astype(F32) for w in ws))
    assert out.shape == (batch, 256) and x_new.shape == (batch, hid)
    assert rel(x_new, combine_reference(x, parts)) < 1e-2
    assert rel(out, ref32) < 1e-2 and rel(out, ref) < 1e-2


def test_norm_matvec_float32_logits_split():
    k = fresh(3)
    x, nw, w = rand(k[0], (1, 128), F32), 1 + rand(k[1], (128,), F32, 0.1), rand(k[2], (512, 128), F32, 0.05)
    out = norm_matvec(x, nw, 1e-6, (w,), out_dtype=F32, config=MatvecConfig(bn=128, bk=32, split=4))
    assert out.shape == (4, 1, 512)
    assert rel(out.sum(0), norm_matvec_reference(x, nw, 1e-6, (w,), out_dtype=F32)) < 1e-5


@pytest.mark.parametrize("bk", [64, 128])  # 128: one K step, loop-free
def test_swiglu_matvec(bk):
    k = fresh(5)
    x, parts = rand(k[0], (2, 128)), rand(k[1], (2, 2, 128), F32)
    nw, wg, wu = 1 + rand(k[2], (128,), scale=0.1), rand(k[3], (256, 128), scale=0.1), rand(k[4], (256, 128), scale=0.1)
    out, _ = swiglu_matvec(x, nw, 1e-5, wg, wu, x_parts=parts, config=MatvecConfig(bn=64, bk=bk))
    xs = combine_reference(x, parts)
    ref = swiglu_matvec_reference(*up(xs, nw), 1e-5, *up(wg, wu))
    assert out.shape == (2, 256) and rel(out, ref) < 1e-2


def test_swiglu_matvec_on_normed_input():
    """norm_weight None: the input is normed already (a stream_norm launch made it), taken as it is."""
    k = fresh(3)
    h, wg, wu = rand(k[0], (8, 128)), rand(k[1], (256, 128), scale=0.1), rand(k[2], (256, 128), scale=0.1)
    out = swiglu_matvec(h, None, 1e-5, wg, wu, config=MatvecConfig(bn=64, bk=64))
    ref = swiglu_matvec_reference(*up(h), None, 1e-5, *up(wg, wu))
    assert out.shape == (8, 256) and rel(out, ref) < 1e-2


def test_matvec_residual():
    k = fresh(3)
    x, w, r = rand(k[0], (1, 256)), rand(k[1], (128, 256), scale=0.05), rand(k[2], (1, 128))
    out = matvec_residual(x, w, r, config=MatvecConfig(bn=32, bk=64))
    assert out.dtype == BF16 and rel(out, matvec_residual_reference(*up(x, w, r))) < 1e-2


def test_shape_checks():
    x, w = jnp.zeros((1, 128), BF16), jnp.zeros((96, 128), BF16)
    with pytest.raises(ValueError, match="multiple of bn"):
        matvec(x, w, config=MatvecConfig(bn=64, bk=32))
    with pytest.raises(ValueError, match=r"is not \[N, K\]"):
        matvec(jnp.zeros((1, 64), BF16), w)
    with pytest.raises(ValueError, match="batch"):
        matvec(jnp.zeros((17, 128), BF16), jnp.zeros((64, 128), BF16))
    with pytest.raises(ValueError, match="unknown implementation"):
        ops.matvec(x, w, implementation="cuda")


def test_ops_xla_path_is_the_reference():
    k = fresh(2)
    x, w = rand(k[0], (2, 64), F32), rand(k[1], (32, 64), F32)
    np.testing.assert_array_equal(ops.matvec(x, w), matvec_reference(x, w))
    parts = ops.matvec(x, w, config=MatvecConfig(split=2))
    assert parts.shape == (1, 2, 32)  # the XLA path's partial sums: one part


# --- compiled on the GPU, real model shapes -------------------------------------------------------------------

FMA = MatvecConfig(bn=128, bk=32, mode="fma")
GPU_CASES = [  # (op, batch, K, ns, config: None = the tuned one)
    ("qkv", 1, 4096, (4096, 1024, 1024), None),
    ("gate_up", 1, 4096, (14336, 14336), None),
    ("gate_up", 1, 2048, (8192, 8192), None),
    ("down", 1, 14336, (4096,), None),
    ("down", 1, 8192, (2048,), None),
    ("lm_head", 1, 2048, (128256,), None),
    ("qkv", 8, 4096, (4096, 1024, 1024), None),
    ("gate_up", 8, 4096, (14336, 14336), None),
    ("qkv", 1, 4096, (4096, 1024, 1024), MatvecConfig(bn=128, bk=64, split=8, mode="fma")),
    ("gate_up", 1, 4096, (14336, 14336), FMA),
    ("lm_head", 1, 4096, (128256,), MatvecConfig(bn=256, bk=32, mode="fma")),
    ("down", 1, 14336, (4096,), MatvecConfig(bn=64, bk=64, split=8, mode="fma")),
    ("down", 1, 14336, (4096,), MatvecConfig(bn=32, bk=128, split=1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("op,batch,k_dim,ns,config", GPU_CASES)
def test_gpu_matvec_family(op, batch, k_dim, ns, config):
    from tilert_jax.kernels import tuning

    keys = fresh(4 + len(ns))
    x = rand(keys[0], (batch, k_dim))
    parts = rand(keys[1], (2, batch, k_dim), F32, 0.5)
    nw = 1 + rand(keys[2], (k_dim,), scale=0.1)
    ws = tuple(rand(kk, (n, k_dim), scale=0.02) for kk, n in zip(keys[4:], ns))
    cfg = config or tuning.matvec_config(op, batch, k_dim, ns)
    xs = combine_reference(x, parts)
    if op == "gate_up":
        out, _ = fused_matvec(x, ws, x_parts=parts, norm_weight=nw, eps=1e-5, swiglu=True, config=cfg,
                              interpret=False)
        ref = swiglu_matvec_reference(*up(xs, nw), 1e-5, *up(*ws))
    elif op == "down":
        r = rand(keys[3], (batch, ns[0]))
        if cfg.split > 1:
            out = fused_matvec(x, ws, config=cfg, interpret=False).sum(0)
            ref = matvec_reference(*up(x, ws[0]), out_dtype=F32)
        else:
            out = fused_matvec(x, ws, residual=r, config=cfg, interpret=False)
            ref = matvec_residual_reference(*up(x, ws[0], r))
    else:
        out, x_new = fused_matvec(x, ws, x_parts=parts, norm_weight=nw, eps=1e-5, out_dtype=F32, config=cfg,
                                  interpret=False)
        if cfg.split > 1:
            out = out.sum(0)
        assert rel(x_new, xs) < 1e-2
        with jax.default_matmul_precision("highest"):
            ref = norm_matvec_reference(*up(xs, nw), 1e-5, tuple(w.astype(F32) for w in ws))
    with jax.default_matmul_precision("highest"):
        ref = jnp.asarray(ref)
    assert rel(out, ref) < 1e-2, (op, cfg)
