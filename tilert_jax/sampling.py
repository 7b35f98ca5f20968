"""Next-token sampling on the device: greedy, temperature, top-k, top-p; seeded and reproducible.

The order of the filters follows transformers: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static (hashable): each distinct setting compiles its own decode loop."""

    temperature: float = 0.0  # 0 is greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """logits: float32[B, vocab] -> int32[B]."""
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        candidates, candidate_ids = jax.lax.top_k(logits, params.top_k)  # [B, k], sorted descending
    else:
        candidate_ids = jnp.argsort(-logits, axis=-1)  # [B, vocab]
        candidates = jnp.take_along_axis(logits, candidate_ids, axis=-1)
    if params.top_p is not None and params.top_p < 1:
        probs = jax.nn.softmax(candidates, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly better candidates
        candidates = jnp.where(mass_before < params.top_p, candidates, -jnp.inf)  # the first one always stays
    choice = jax.random.categorical(key, candidates, axis=-1)  # [B]
    return jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
