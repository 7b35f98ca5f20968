"""The ops the models call, each behind an `implementation="xla" | "pallas"` switch. The XLA path always exists: it is
the op's plain-jnp reference, which XLA compiles as it likes.

Split-K results: when a matrix-vector op's config has split > 1, the result is float32 partial sums [S, B, N] whose
sum over axis 0 is the product (the XLA path returns S = 1); a consumer adds them (`x_parts=`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tilert_jax.kernels import decode_attention as _da
from tilert_jax.kernels import layer_decode as _ld
from tilert_jax.kernels import matvec as _mv
from tilert_jax.kernels import matvec_residual as _mr
from tilert_jax.kernels import mlp_block as _mb
from tilert_jax.kernels import norm_matvec as _nm
from tilert_jax.kernels import qkv_rope as _qr
from tilert_jax.kernels import stream_attention as _sa
from tilert_jax.kernels import swiglu_matmul as _sm
from tilert_jax.kernels import swiglu_matvec as _sw
from tilert_jax.kernels.attention import attention_reference, self_attention_fused, self_attention_reference
from tilert_jax.kernels.rms_norm import rms_norm_reference

IMPLEMENTATIONS = ("xla", "pallas")


def _check(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r} (one of {IMPLEMENTATIONS})")


def _as_parts(y, config):
    """The XLA path's result in the shape the Pallas path gives for this config."""
    return y.astype(jnp.float32)[None] if config is not None and config.split > 1 else y


def rms_norm(x, weight, eps, *, implementation="xla"):
    _check(implementation)
    return rms_norm_reference(x, weight, eps)


def attention(q, k, v, q_pos, k_pos, *, scale, sliding_window=None, implementation="xla"):
    _check(implementation)
    return attention_reference(q, k, v, q_pos, k_pos, scale=scale, sliding_window=sliding_window)


def self_attention(q, k, v, *, scale, sliding_window=None, implementation="xla"):
    """Causal attention of T tokens over their own keys ([B, T, heads, head_dim] each); "pallas" takes the fused
    (cuDNN flash) kernel on a GPU."""
    _check(implementation)
    fn = self_attention_fused if implementation == "pallas" else self_attention_reference
    return fn(q, k, v, scale=scale, sliding_window=sliding_window)


def matvec(x, w, *, out_dtype=None, config=None, implementation="xla"):
    """x [B, K] @ w [N, K]^T -> [B, N] (or partial sums, see above)."""
    _check(implementation)
    if implementation == "pallas":
        return _mv.matvec(x, w, out_dtype=out_dtype, config=config)
    return _as_parts(_mv.matvec_reference(x, w, out_dtype=out_dtype), config)


def norm_matvec(x, norm_weight, eps, weights, *, x_parts=None, out_dtype=None, config=None, implementation="xla"):
    """rms_norm(x [+ x_parts]) @ [W_1 | W_2 ...]^T (each [N_i, K]) -> y (or partial sums), plus x_new when x_parts is
    given."""
    _check(implementation)
    if implementation == "pallas":
        return _nm.norm_matvec(x, norm_weight, eps, weights, x_parts=x_parts, out_dtype=out_dtype, config=config)
    out = _nm.norm_matvec_reference(x, norm_weight, eps, weights, x_parts=x_parts, out_dtype=out_dtype)
    if x_parts is not None:
        return _as_parts(out[0], config), out[1]
    return _as_parts(out, config)


def swiglu_matvec(x, norm_weight, eps, w_gate, w_up, *, x_parts=None, config=None, implementation="xla"):
    """silu(rms_norm(x) @ w_gate^T) * (rms_norm(x) @ w_up^T) (each [F, K]) -> [B, F], plus x_new when x_parts is
    given."""
    _check(implementation)
    if implementation == "pallas":
        return _sw.swiglu_matvec(x, norm_weight, eps, w_gate, w_up, x_parts=x_parts, config=config)
    return _sw.swiglu_matvec_reference(x, norm_weight, eps, w_gate, w_up, x_parts=x_parts)


def layer_decode_supported(x, ffn: int) -> bool:
    """Whether the Mosaic GPU weight stream (layer_decode.py) runs here, for x [1, H] and this intermediate size."""
    return _ld.supported(x) and _ld.down_splits(x.shape[1], ffn) is not None


StreamAttention = _sa.Attention  # a layer_block's next_attention


def stream_attention_supported(x, ffn: int, attention: StreamAttention) -> bool:
    """Whether layer_block's "pallas" launch takes this next_attention (see stream_attention.supported)."""
    return layer_decode_supported(x, ffn) and _sa.supported(attention, _ld.default_programs())


def mlp_block(x, norm_weight, eps, w_gate, w_up, w_down, *, x_parts=None, configs=None, counters=None,
              implementation="xla"):
    """The dense MLP on rms_norm(x [+ x_parts]) -> (float32 partial sums [S, B, H] of its output, x_new [B, H],
    counters); "pallas" runs it as one launch: at one token on a Hopper GPU the Mosaic GPU weight stream
    (layer_decode.py, its grid barriers' counters: pass them to the next layer's call), elsewhere the phased Triton
    kernel (configs: its (gate/up, down) tile configs; the counters returned as given, as on the XLA path)."""
    _check(implementation)
    if implementation == "pallas":
        if layer_decode_supported(x, w_gate.shape[0]):
            return _ld.layer_decode(x, norm_weight, eps, w_gate, w_up, w_down, x_parts=x_parts, counters=counters)
        gate_up, down = configs or (None, None)
        return (*_mb.mlp_block(x, norm_weight, eps, w_gate, w_up, w_down, x_parts=x_parts, gate_up=gate_up,
                               down=down), counters)
    return (*_mb.mlp_block_reference(x, norm_weight, eps, w_gate, w_up, w_down, x_parts=x_parts), counters)


def layer_block(x, mlp_norm, eps, w_gate, w_up, w_down, *, attn, w_o, x_parts=None, next_norm=None, next_qkv=None,
                next_attention=None, counters=None, implementation="xla"):
    """One token's layer after its attention: x + attn @ w_o^T, the MLP on its norm, and (given next_norm and
    next_qkv = (W_q, W_k, W_v)) the next layer's Q/K/V projection -> (float32 partial sums: the Q/K/V projection's
    [S, 1, N] with x_new complete, or the MLP's [S, 1, H] pending on x_new; x_new [1, H]; counters), then with
    next_attention (stream_attention.Attention) the next layer's attention (its output: stream_attention.Partials
    from "pallas", [1, n * d] from "xla"; either is the next call's attn) and its k_cache and v_cache. "pallas" is the
    Mosaic GPU weight stream (layer_decode.py: one launch; see layer_decode_supported)."""
    _check(implementation)
    args = (x, mlp_norm, eps, w_gate, w_up, w_down)
    products = dict(x_parts=x_parts, attn=attn, w_o=w_o, next_norm=next_norm, next_qkv=next_qkv,
                    next_attention=next_attention)
    if implementation == "pallas":
        return _ld.layer_decode(*args, **products, counters=counters)
    parts, x_new, *attention = _ld.layer_decode_reference(*args, **products)
    return parts, x_new, counters, *attention


def matvec_residual(x, w, residual, *, config=None, implementation="xla"):
    """residual + x @ w^T (w [N, K]) -> [B, N]."""
    _check(implementation)
    if implementation == "pallas":
        return _mr.matvec_residual(x, w, residual, config=config)
    return _mr.matvec_residual_reference(x, w, residual)


def decode_attention(qkv, k_cache, v_cache, pos, cos, sin, *, num_heads, num_kv_heads, scale, eps=1e-6, bias=None,
                     qk_norm=None, sliding_window=None, config=None, arrivals=None, partials=False,
                     implementation="xla"):
    """One decode step of attention with rope, q/k norm and the cache write -> out [B, n, d], k_cache, v_cache and
    the split kernel's arrival counters (pass them to the next layer's call; the XLA path returns them as given).
    With partials (batch 1), out is stream_attention.Partials for layer_block's attn: the splits, merged there."""
    _check(implementation)
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale, eps=eps, bias=bias, qk_norm=qk_norm,
                  sliding_window=sliding_window)
    if implementation == "pallas":
        return _da.decode_attention(qkv, k_cache, v_cache, pos, cos, sin, **kwargs, **(config or {}),
                                    arrivals=arrivals, partials=partials)
    out, k_cache, v_cache = _da.decode_attention_reference(qkv, k_cache, v_cache, pos, cos, sin, **kwargs)
    return (_sa.one_split(out, num_kv_heads) if partials else out), k_cache, v_cache, arrivals


def qkv_rope(x, wq, wk, wv, cos, sin, caches=None, pos=0, *, eps=1e-6, bias=None, qk_norm=None, config=None,
             implementation="xla"):
    """A sequence's Q/K/V projection with bias, q/k norm and rope, and its keys and values written into the caches
    at pos (x [B, T, hidden], weights [heads, d, hidden]) -> q, k, v [B, T, heads, d] and the caches (None without
    them); "pallas" is one launch (config: its tiling)."""
    _check(implementation)
    fn = _qr.qkv_rope if implementation == "pallas" else _qr.qkv_rope_reference
    kwargs = dict(config or {}) if implementation == "pallas" else {}
    return fn(x, wq, wk, wv, cos, sin, caches, pos, eps=eps, bias=bias, qk_norm=qk_norm, **kwargs)


def swiglu_matmul(x, w_gate, w_up, *, config=None, implementation="xla"):
    """A sequence's gate/up products and SwiGLU: silu(x @ w_gate.T) * (x @ w_up.T) for x [..., K] and weights
    [N, K] -> [..., N]. "pallas" is one Mosaic GPU launch (config: its tiling) where it runs (a Hopper GPU,
    kernels/swiglu_matmul.py `supported`), the XLA path elsewhere."""
    _check(implementation)
    if implementation == "pallas" and config is not None and _sm.supported(x):
        rows = x.reshape(-1, x.shape[-1])
        return _sm.swiglu_matmul(rows, w_gate, w_up, **config).reshape(*x.shape[:-1], w_gate.shape[0])
    return jax.nn.silu(x @ w_gate.T) * (x @ w_up.T)
