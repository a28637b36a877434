"""Rotary position embeddings (RoFormer) with the long-context scalings HF checkpoints use.

Frequencies are computed in float64 with numpy at trace time (they depend only on the config),
then the angles `positions * inv_freq` in float32 on device, as transformers does, so the
rotation matches HF bit for bit in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """`(inv_freq [head_dim/2] float32, attention_factor)` for `rope`.

    attention_factor scales cos and sin (YaRN's temperature, paper §3.4); 1.0 for the others.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    pos_freqs = np.float32(rope.theta) ** exponents
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        # Position interpolation: positions / factor, i.e. every frequency / factor.
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.type == "llama3":
        return _llama3(rope, inv_freq), 1.0
    return _yarn(rope, head_dim, pos_freqs)


def _llama3(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    old_context = rope.original_max_position_embeddings
    if old_context is None:
        raise ValueError("rope type llama3 needs original_max_position_embeddings")
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    factor = np.float32(rope.factor)
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: RopeConfig, head_dim: int, pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    # YaRN (Peng et al. 2023): interpolate low-frequency dimensions, extrapolate high-frequency
    # ones, linear ramp between the dimensions that rotate beta_slow..beta_fast times.
    original = rope.original_max_position_embeddings
    if original is None:
        raise ValueError("rope type yarn needs original_max_position_embeddings")
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    extrapolated = (1.0 / pos_freqs).astype(np.float32)
    interpolated = (1.0 / (np.float32(rope.factor) * pos_freqs)).astype(np.float32)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(rope: RopeConfig, head_dim: int, positions_bt: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin `[B, T, head_dim]` (float32) for integer positions `[B, T]`."""
    inv_freq, attention_factor = inverse_frequencies(rope, head_dim)
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_btd = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_btd) * attention_factor, jnp.sin(angles_btd) * attention_factor


@jax.custom_vjp
def apply_rope(x_btnh: jnp.ndarray, cos_bth: jnp.ndarray, sin_bth: jnp.ndarray) -> jnp.ndarray:
    """Rotate `[B, T, N, hd]` by the angles; HF's half-split layout (rotate_half), not interleaved.

    cos and sin must be as `rope_cos_sin` gives them (each half of the last dim the same): the
    backward relies on it, rotating the gradient back by −angle (`x·cos − rotate_half(x)·sin`)
    as one elementwise pass where autodiff of the slices and concatenation took two and a half
    times as long (a pad-and-add fusion, 40 µs against 24 for the forward on the 1B step's q).
    No gradient reaches cos and sin (positions are integers)."""
    return _rotate(x_btnh, cos_bth, sin_bth)


def _rotate(x_btnh, cos_bth, sin_bth):
    half = x_btnh.shape[-1] // 2
    x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return (x_btnh * cos + rotated * sin).astype(x_btnh.dtype)


def _apply_rope_fwd(x_btnh, cos_bth, sin_bth):
    return _rotate(x_btnh, cos_bth, sin_bth), (cos_bth, sin_bth)


def _apply_rope_bwd(residuals, dy_btnh):
    cos_bth, sin_bth = residuals
    return _rotate(dy_btnh, cos_bth, -sin_bth), jnp.zeros_like(cos_bth), jnp.zeros_like(sin_bth)


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)
