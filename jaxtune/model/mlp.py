"""The gated MLP (`down(act(gate(x)) · up(x))`: SwiGLU, GeGLU) and the hook for fused versions.

`gated_mlp` runs the three projections through `linear`, so any weight leaf type works. A
parameter transform that can do better on the whole block (LoRA: `jaxtune/lora_gated_down.py`
takes the activation and a LoRA down_proj as one function) registers a function that returns the
block's output, or None for params it does not take; the first that answers wins. Model code
stays unaware of them (DESIGN.md invariant 2).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxtune.kernels.activation_math import REFERENCE
from jaxtune.model.linear import linear
from jaxtune.sharding import constrain

MLP = ("act_batch", "act_length", "act_mlp")  # logical axes of the [B, T, F] activations

FusedMlp = Callable[[jax.Array, dict, str, object, "jax.Array | None"], "jax.Array | None"]
_FUSED: list[FusedMlp] = []


def register_fused_mlp(impl: FusedMlp) -> None:
    """Make `gated_mlp` try `impl(x_btd, mlp_params, hidden_act, dtype, residual)` before the plain
    form: the block's output plus `residual` (None: the output alone), or None where it does not
    take these params."""
    if impl not in _FUSED:
        _FUSED.append(impl)


# Computed in float32 from bf16 inputs. Differentiated plainly, autodiff would keep the float32
# intermediates (gate and up upcast, the activation) for the backward pass: on the 1B shape about
# 0.6 GB per layer more than the bf16 inputs they come from. Under `jax.checkpoint` only the inputs
# are kept and the backward recomputes these elementwise ops (same arithmetic, same gradients).
@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def gated_activation(gate: jax.Array, up: jax.Array, hidden_act: str) -> jax.Array:
    """act(gate) · up in float32, returned in gate's dtype."""
    return (REFERENCE[hidden_act](gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def gated_mlp(x_btd: jax.Array, mlp: dict, hidden_act: str, dtype, *, fused: bool = True,
              residual: jax.Array | None = None) -> jax.Array:
    """The MLP block's output `[B, T, D]` in `dtype` for its normed input `x_btd`, plus `residual`
    (`[B, T, D]` in `dtype`) if given, which the down projection's kernels may add in their
    epilogue; `fused=False` skips the registered fused versions (the per-projection form, for
    comparisons)."""
    for impl in _FUSED if fused else ():
        out = impl(x_btd, mlp, hidden_act, dtype, residual)
        if out is not None:
            return out
    gate_btf = linear(x_btd, mlp["gate_proj"]["kernel"], "btd,df->btf", dtype, mlp["gate_proj"].get("bias"))
    up_btf = linear(x_btd, mlp["up_proj"]["kernel"], "btd,df->btf", dtype, mlp["up_proj"].get("bias"))
    act_btf = constrain(gated_activation(gate_btf, up_btf, hidden_act), MLP)
    return linear(act_btf, mlp["down_proj"]["kernel"], "btf,fd->btd", dtype, mlp["down_proj"].get("bias"),
                  residual=residual)
