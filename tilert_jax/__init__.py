"""tilert_jax: batch-1, lowest-latency LLM decoding in JAX."""

from tilert_jax.config import config_from_hf, load_config, preset
from tilert_jax.engine import GenerationResult, Model, load
from tilert_jax.models import family


def forward(config, params, tokens, impl: str = "xla"):
    """tokens: int[B, T] at positions 0..T-1 -> float32 logits [B, T, vocab]. A pure function: config is static;
    it composes with jax.jit (close over config or mark it static), jax.grad and jax.vmap."""
    return family(config).forward(config, params, tokens, impl=impl)


__all__ = ["GenerationResult", "Model", "config_from_hf", "forward", "load", "load_config", "preset"]
