"""Rotary position embeddings: the frequency table of each Hugging Face rope type, and its application.

The tables are computed in float32 exactly as transformers computes them, so float32 logits agree to rounding.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """One rope variant, read from either config.json dialect (see `from_hf`)."""

    theta: float
    rotary_dim: int  # number of rotated channels per head (head_dim, or the rope part of an MLA head)
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, hf: dict, rotary_dim: int) -> "RopeConfig":
        """Reads `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (most hub checkpoints)."""
        params = dict(hf.get("rope_parameters") or {})
        scaling = dict(hf.get("rope_scaling") or {})
        merged = {**scaling, **params}
        theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        original = merged.get("original_max_position_embeddings")
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in merged.items() if k in fields and v is not None
                 and k not in ("rope_type", "original_max_position_embeddings")}
        if rope_type == "yarn" and "factor" not in extra:
            # Without an explicit factor, transformers derives it from the two context lengths.
            extra["factor"] = hf["max_position_embeddings"] / original
        return cls(theta=float(theta), rotary_dim=rotary_dim, rope_type=rope_type,
                   original_max_position_embeddings=original or hf.get("max_position_embeddings"), **extra)

    def inv_freq(self) -> np.ndarray:
        """float32[rotary_dim // 2]: the angular frequency of each rotated pair."""
        dim = self.rotary_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        base = np.float32(self.theta) ** exponents  # [dim // 2]
        inv = (np.float32(1.0) / base).astype(np.float32)
        if self.rope_type == "linear":
            return (inv / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv, self)
        if self.rope_type == "yarn":
            return _yarn_inv_freq(base, self)
        return inv

    def attention_scaling(self) -> float:
        """The factor transformers multiplies cos and sin by (1 except for yarn)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            return float(yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim))
        return float(yarn_mscale(self.factor))


def _llama3_inv_freq(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_freq_wavelen, inv / rope.factor, inv)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """Yarn's magnitude correction for a context stretched `scale` times (DeepSeek also scales its softmax by it)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(base_pow: np.ndarray, rope: RopeConfig) -> np.ndarray:
    dim = rope.rotary_dim

    def correction_dim(rotations: float) -> float:
        context = rope.original_max_position_embeddings
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    extrapolation = (np.float32(1.0) / base_pow).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(rope.factor) * base_pow)).astype(np.float32)
    return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


def rope_tables(rope: RopeConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin: dtype[..., rotary_dim] for integer positions [...], laid out as transformers' rotate_half expects."""
    inv = jnp.asarray(np.tile(rope.inv_freq(), 2))  # [rotary_dim]: a pair's frequency on both halves
    angles = positions.astype(jnp.float32)[..., None] * inv  # [..., rotary_dim] (cos and sin: one fusion of it)
    scale = rope.attention_scaling()
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, heads, rotary_dim]; cos, sin: [B or 1, T, rotary_dim]. Non-interleaved (rotate_half) layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def apply_rope_interleaved(x: jnp.ndarray,  # [B, T, heads, rope_dim], channels in (x0, x1), (x2, x3), ... pairs
                           cos: jnp.ndarray,  # [B or 1, T, rope_dim] (cat(freqs, freqs) layout, scaling applied)
                           sin: jnp.ndarray,  # [B or 1, T, rope_dim]
                           ) -> jnp.ndarray:  # [B, T, heads, rope_dim] in x's dtype: [even outputs, odd outputs]
    """DeepSeek's interleaved rope (MLA). The output layout is transformers' `apply_rotary_pos_emb_interleave` (evens,
    then odds); V2's complex form returns the pairs interleaved instead, which is the same vector up to one fixed
    permutation applied to both queries and keys, so every score is the same. Computed in cos's dtype."""
    half = x.shape[-1] // 2
    c = cos[..., :half][:, :, None, :]
    s = sin[..., :half][:, :, None, :]
    xc = x.astype(cos.dtype)
    x1, x2 = xc[..., 0::2], xc[..., 1::2]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
