"""RMSNorm, residual add + RMSNorm and the MLP's gated activation: the model's elementwise work,
and where it runs.

XLA splits each of these into several fusions that read the same `[tokens, features]` arrays again
(1B LoRA step on an H200: an RMSNorm ≈ 53 µs forward and 90 µs backward where one pass over its
data needs ≈ 15 and 30; the SwiGLU backward two fusions of 137 µs where one pass needs ≈ 150 for
both). On a GPU they therefore run as our Pallas kernels (kernels/rms_norm.py,
kernels/gated_activation.py), one pass each way; elsewhere, and for shapes the kernels do not
take, as the plain jnp below, which is also their reference.

A `pallas_call` has no sharding rule (the partitioner would gather its inputs onto every device),
so under a mesh the kernels run per shard in `shard_map`: the norms over rows (their feature
dimension must not be split), the activation over any split.

Both jnp forms compute in float32 from bf16 inputs. Differentiated plainly, autodiff would keep
their float32 intermediates (x·rsqrt, gate and up upcast, SiLU) for the backward pass: on the 1B
shape about 0.6 GB per layer more than the bf16 inputs they come from. Under `jax.checkpoint` only
the inputs are kept and the backward recomputes these elementwise ops (same arithmetic, same
gradients); the kernels keep only their inputs too.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.sharding import active_mesh, active_spec, shard_counts

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# "auto": the Pallas kernels on a GPU, jnp elsewhere; "off": jnp everywhere; "interpret": the
# kernels everywhere, in Pallas interpret mode off the GPU (tests on CPU set this).
KERNELS = "auto"


def _kernel_mode() -> tuple[bool, bool]:
    """(use the kernels, in interpret mode)."""
    on_gpu = jax.default_backend() == "gpu"
    if KERNELS == "off" or (KERNELS == "auto" and not on_gpu):
        return False, False
    return True, not on_gpu


@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def rms_norm_jnp(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to x's dtype before the scale (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def gated_activation_jnp(gate: jax.Array, up: jax.Array, hidden_act: str) -> jax.Array:
    """act(gate) · up in float32, returned in gate's dtype (the MLP's SwiGLU/GeGLU)."""
    return (_ACTIVATIONS[hidden_act](gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _per_shard(fn: Callable, arrays: tuple, replicated: tuple, names: tuple[str | None, ...], rowwise: bool,
               n_out: int, supports: Callable[[tuple[int, ...]], bool]):
    """`fn(*arrays, *replicated)` on each device's shard of `arrays` (all of one shape, laid out by
    the logical `names`; `replicated` whole on every device), or None where the kernel does not
    take the shard's shape or, being row-wise, would see split rows."""
    spec = active_spec(names, arrays[0].shape)
    counts = shard_counts(names, arrays[0].shape)
    if not supports(tuple(n // c for n, c in zip(arrays[0].shape, counts))):
        return None
    if spec is None or all(axes is None for axes in spec):
        return fn(*arrays, *replicated)
    if rowwise and spec[-1] is not None:
        return None
    out_specs = spec if n_out == 1 else (spec,) * n_out
    return jax.shard_map(fn, mesh=active_mesh(), in_specs=(spec,) * len(arrays) + (P(),) * len(replicated),
                         out_specs=out_specs)(*arrays, *replicated)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, names: tuple[str | None, ...]) -> jax.Array:
    """RMSNorm over x's last dimension; `names` are x's logical axes (for the kernel's shard_map)."""
    use, interpret = _kernel_mode()
    if use:
        from jaxtune.kernels import rms_norm as kernel

        out = _per_shard(lambda x_, scale_: kernel.rms_norm(x_, scale_, eps, interpret=interpret), (x,), (scale,),
                         names, rowwise=True, n_out=1, supports=lambda shape: kernel.supports(shape, x.dtype))
        if out is not None:
            return out
    return rms_norm_jnp(x, scale, eps)


def add_rms_norm(h: jax.Array, delta: jax.Array, scale: jax.Array, eps: float, names: tuple[str | None, ...],
                 name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """`(s, rms_norm(s))` with `s = h + delta` (a residual stream and what joins it), in one pass.

    `name`: the `checkpoint_name` the kernel gives s where it keeps s for its backward, so that a
    remat policy saving that name (the caller names the returned s alike) keeps one copy and does
    not recompute h and delta."""
    use, interpret = _kernel_mode()
    if use:
        from jaxtune.kernels import rms_norm as kernel

        out = _per_shard(lambda h_, d_, scale_: kernel.add_rms_norm(h_, d_, scale_, eps, interpret=interpret, name=name),
                         (h, delta), (scale,), names, rowwise=True, n_out=2,
                         supports=lambda shape: kernel.supports(shape, h.dtype))
        if out is not None:
            return out
    s = h + delta
    return s, rms_norm_jnp(s, scale, eps)


def gated_activation(gate: jax.Array, up: jax.Array, hidden_act: str, names: tuple[str | None, ...]) -> jax.Array:
    """act(gate) · up (the MLP's SwiGLU/GeGLU), in gate's dtype."""
    use, interpret = _kernel_mode()
    if use:
        from jaxtune.kernels import gated_activation as kernel

        out = _per_shard(lambda g, u: kernel.gated_activation(g, u, hidden_act, interpret=interpret), (gate, up), (),
                         names, rowwise=False, n_out=1,
                         supports=lambda shape: kernel.supports(shape, gate.dtype, hidden_act))
        if out is not None:
            return out
    return gated_activation_jnp(gate, up, hidden_act)
