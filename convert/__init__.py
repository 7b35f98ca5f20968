"""Hugging Face (bf16, FP8 block-scaled) and TileRT checkpoints into this engine's orbax checkpoints."""

from tilert_jax.convert.hf import CheckpointError, iter_hf_params
from tilert_jax.convert.writer import convert

__all__ = ["CheckpointError", "convert", "iter_hf_params"]
