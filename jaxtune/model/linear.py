"""`linear(x, w, spec)`: the one function every projection in the model calls.

It dispatches on the type of the weight leaf. A plain array is an einsum in the compute dtype
with float32 accumulation. Parameter transforms (LoRA, NF4 quantisation) replace a weight by
their own pytree leaf type and register how that type multiplies here, so model code never
mentions them (DESIGN.md invariant 2).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LinearImpl = Callable[..., jax.Array]
_IMPLS: dict[type, LinearImpl] = {}
_TAKES_RESIDUAL: set[type] = set()
ConcatImpl = Callable[[list, int, list], object]
_CONCATS: dict[type, ConcatImpl] = {}


def register_linear(leaf_type: type, impl: LinearImpl, *, takes_residual: bool = False) -> None:
    """Make `linear` call `impl(x, w, spec, dtype)` (float32 or `dtype` result) for `leaf_type` weights;
    with `takes_residual`, `impl(x, w, spec, dtype, residual)` (residual: None or an array to add to
    the result, in `dtype`), so that it can add it inside its own kernels."""
    _IMPLS[leaf_type] = impl
    if takes_residual:
        _TAKES_RESIDUAL.add(leaf_type)


def register_concat(leaf_type: type, impl: ConcatImpl) -> None:
    """Make `concat_outputs` call `impl(leaves, in_ndim, out_shapes)` for leaves of `leaf_type`; it
    returns one leaf or None where it cannot (e.g. per-leaf dropout that one leaf cannot hold)."""
    _CONCATS[leaf_type] = impl


def concat_outputs(leaves: list, in_ndim: int, out_shapes: list[tuple[int, ...]]):
    """One weight leaf whose product is the leaves' products side by side, or None.

    Each leaf is a kernel `[*in, *out_i]` with `in_ndim` input dims; its output dims are reshaped
    to `out_shapes[i]` (all with the same leading dims) and the results concatenated along the
    last one. None when the leaves differ in type or their type cannot be concatenated, and the
    caller then projects by each leaf on its own.
    """
    if all(isinstance(w, (jax.Array, np.ndarray)) for w in leaves):
        if len({w.dtype for w in leaves}) != 1:
            return None
        return concat_kernels(leaves, in_ndim, out_shapes)
    kinds = {type(w) for w in leaves}
    if len(kinds) != 1:
        return None
    impl = _CONCATS.get(kinds.pop())
    return None if impl is None else impl(leaves, in_ndim, out_shapes)


def concat_kernels(kernels: list, in_ndim: int, out_shapes: list[tuple[int, ...]]) -> jax.Array:
    """Plain kernels `[*in, *out_i]` reshaped to `[*in, *out_shapes[i]]`, concatenated on the last axis."""
    return jnp.concatenate([w.reshape(w.shape[:in_ndim] + tuple(s)) for w, s in zip(kernels, out_shapes)], axis=-1)


def dense(x: jax.Array, kernel: jax.Array, spec: str, dtype, out_dtype=jnp.float32) -> jax.Array:
    """`einsum(spec, x, kernel)` with both operands in `dtype`, accumulated in float32 and written
    in `out_dtype`. Writing bf16 straight from the matmul saves a separate cast pass over the
    output (23% of a 4096×14336 projection's time on an H100)."""
    return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype), preferred_element_type=out_dtype)


def linear(x: jax.Array, w, spec: str, dtype, bias: jax.Array | None = None,
           residual: jax.Array | None = None) -> jax.Array:
    """Project `x` by weight leaf `w` following einsum `spec` (e.g. 'btd,dnh->btnh').

    Shapes are in the spec's letters; the result is in `dtype`. `bias` has the output's trailing
    shape and is added in float32 before the cast to `dtype`. `residual` (the output's shape, in
    `dtype`): the result is `residual + projection`, as the caller would add it; a weight type
    registered `takes_residual` may add it inside its product's kernel.
    """
    if isinstance(w, (jax.Array, np.ndarray)):
        out = dense(x, w, spec, dtype, out_dtype=dtype if bias is None else jnp.float32)
    else:
        impl = _IMPLS.get(type(w))
        if impl is None:
            raise TypeError(f"linear() has no implementation for weight leaf type {type(w).__name__}")
        if type(w) in _TAKES_RESIDUAL and bias is None:
            return impl(x, w, spec, dtype, residual).astype(dtype)
        out = impl(x, w, spec, dtype)
    if bias is not None:
        out = out.astype(jnp.float32) + bias.astype(jnp.float32)
    out = out.astype(dtype)
    return out if residual is None else residual + out
