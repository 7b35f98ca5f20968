"""The ops the models call, each behind an `implementation="xla" | "pallas"` switch. The XLA path always exists."""

from tilert_jax.kernels.attention import attention_reference
from tilert_jax.kernels.rms_norm import rms_norm_reference

IMPLEMENTATIONS = ("xla", "pallas")


def _check(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r} (one of {IMPLEMENTATIONS})")


def rms_norm(x, weight, eps, *, implementation="xla"):
    _check(implementation)
    return rms_norm_reference(x, weight, eps)


def attention(q, k, v, q_pos, k_pos, *, scale, sliding_window=None, implementation="xla"):
    _check(implementation)
    return attention_reference(q, k, v, q_pos, k_pos, scale=scale, sliding_window=sliding_window)
