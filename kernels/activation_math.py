"""The MLP's activations and their derivatives in float32, from operations every Pallas backend
lowers (exp, tanh, +, ×, ÷, compare): for kernels that fuse a gated activation with its neighbours.

Semantics are `jax.nn`'s (`ACTIVATIONS` maps the HF `hidden_act` names): "silu" (SwiGLU), "gelu"
(exact, erf), "gelu_pytorch_tanh", "relu". The derivatives are written out:

- silu:              s·(1 + g·(1 − s)),  s = sigmoid(g)
- gelu (erf):        Φ(g) + g·φ(g),  Φ(g) = erfc(−g/√2)/2,  φ the normal density
- gelu_pytorch_tanh: (1 + t)/2 + g·(1 − t²)·√(2/π)·(1 + 3·0.044715·g²)/2,
                     t = tanh(√(2/π)·(g + 0.044715·g³))
- relu:              1 where g > 0, else 0 (0 at g = 0, as `jax.nn.relu`'s gradient)

`lax.erf`/`lax.erfc` have no Pallas Triton lowering (jax 0.11.2), so Φ(g) = erfc(−g/√2)/2 (the
form `jax.nn.gelu` uses) comes from the Chebyshev fit of erfc in Numerical Recipes §6.2 (`erfcc`,
fractional error < 1.2e-7 for every argument): one exp, and relative accuracy kept in the negative
tail where 1 + erf(x) would cancel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")

# The same activations as the model computes them outside kernels (its reference).
REFERENCE = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715

# erfc(z) ≈ t·exp(−z² + C(t)), t = 1/(1 + z/2), z >= 0 (Numerical Recipes §6.2, `erfcc`).
_ERFC_C = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
           0.09678418, 0.37409196, 1.00002368, -1.26551223)  # t^9 ... t^0 coefficients of C


def _horner(coeffs, x):
    acc = coeffs[0]
    for c in coeffs[1:]:
        acc = acc * x + c
    return acc


def _normal_cdf(g):
    """Φ(g) = erfc(−g/√2)/2 from exp, +, ×, ÷ only (see the module docstring)."""
    z = jnp.abs(g) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * z)
    half_erfc = (0.5 * t) * jnp.exp(_horner(_ERFC_C, t) - z * z)  # = Φ(−|g|)
    return jnp.where(g < 0.0, half_erfc, 1.0 - half_erfc)


def _sigmoid(g):
    return 1.0 / (1.0 + jnp.exp(-g))  # exp(-g) = inf for g << 0 gives exactly 0, never NaN


def _gelu_tanh(g):
    """gelu_pytorch_tanh's t = tanh(√(2/π)·(g + 0.044715·g³)), and g² (its derivative reuses it)."""
    g2 = g * g
    t = jnp.tanh(_SQRT_2_OVER_PI * (g + _GELU_TANH_C * (g2 * g)))
    return t, g2


def activation(g, hidden_act: str):
    """act(g) alone for float32 g (a forward that needs no derivative)."""
    if hidden_act == "silu":
        return g * _sigmoid(g)
    if hidden_act == "gelu":
        return g * _normal_cdf(g)
    if hidden_act == "gelu_pytorch_tanh":
        return g * (0.5 * (1.0 + _gelu_tanh(g)[0]))
    if hidden_act == "relu":
        return jnp.maximum(g, 0.0)
    raise ValueError(f"{hidden_act=} must be one of {ACTIVATIONS}")


def activation_and_grad(g, hidden_act: str):
    """(act(g), act'(g)) for float32 g, sharing the transcendental between the two."""
    if hidden_act == "silu":
        s = _sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    if hidden_act == "gelu":
        cdf = _normal_cdf(g)
        return g * cdf, cdf + g * (_INV_SQRT_2PI * jnp.exp(-0.5 * (g * g)))
    if hidden_act == "gelu_pytorch_tanh":
        t, g2 = _gelu_tanh(g)
        cdf = 0.5 * (1.0 + t)
        d_inner = _SQRT_2_OVER_PI * (1.0 + (3.0 * _GELU_TANH_C) * g2)
        return g * cdf, cdf + (0.5 * g) * (1.0 - t * t) * d_inner
    if hidden_act == "relu":
        return jnp.maximum(g, 0.0), jnp.where(g > 0.0, 1.0, 0.0)
    raise ValueError(f"{hidden_act=} must be one of {ACTIVATIONS}")
