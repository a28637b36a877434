"""RMSNorm: the plain form (any shape, autodiff), and the residual stream's norm with a written-out
backward that runs our Pallas kernels (kernels/rms_norm.py) on a GPU.

`residual_rms_norm(h, ...)` returns `(h, norm(h))`: h passes through so that the backward receives
h's gradient from the rest of the layer (the residual path) next to the norm's, and writes their
sum in the norm's own pass (autodiff adds them in a pass of its own). Residuals: h (which the
plain form keeps too) and the rows' 1/rms, `[tokens]` float32.

On by default on a GPU (`KERNELS = "auto"`). Measured on an H200 (benchmarks/RESULTS.md,
fifteenth and sixteenth rounds), interleaved against XLA's fusions of the plain form: the 1B LoRA
step +0.5%, then +0.2% / +0.4% at 1.9–2.2% fewer mJ per token; the 8B LoRA step with remat level
(−0.0% / −0.4%, 0.3–0.5% fewer mJ per token, +0.02 GiB). No more than that, and the profile says
why: the kernels take 1.9 ms per 1B step where XLA's norm fusions took 4.1, but XLA had also folded
the residual adds (`h + o_proj(...)`, `h + mlp(...)`) and the sums of the normed input's gradient
terms (base and LoRA products) into those fusions, and next to an opaque kernel they are passes of
their own (1.0 and 1.1 ms).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune.kernels import rms_norm as kernel
from jaxtune.sharding import per_shard, shard_counts, split_spec

# "auto" (the default): the kernels on a GPU, the plain form elsewhere; "off": the plain form
# everywhere; "interpret": the kernels everywhere, in Pallas interpret mode off a GPU (CPU tests).
KERNELS = "auto"


@jax.custom_vjp
def _materialised(x: jax.Array) -> jax.Array:
    """x, written out as one array in the forward pass; its gradient passes through untouched.

    For the norm's scaled output: left alone, XLA wrote the unscaled normed array and let each
    consumer redo the `* scale`, and where a consumer cannot take the multiply in (cuBLAS's q/k/v
    matmul) that is one more [tokens, D] pass (21 µs per layer on the 1B LoRA step, H200,
    benchmarks/RESULTS.md). A plain `optimization_barrier` would also fence the gradient, and the
    sum of the q/k/v input gradients would then be written out before the norm's backward.
    """
    return jax.lax.optimization_barrier(x)


_materialised.defvjp(lambda x: (jax.lax.optimization_barrier(x), None), lambda _, g: (g,))


# RMSNorm computes in float32 from bf16 inputs. Differentiated plainly, autodiff would keep its
# float32 intermediates (x·rsqrt) for the backward pass; under `jax.checkpoint` only the inputs are
# kept and the backward recomputes the elementwise ops (same arithmetic, same gradients).


@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to x's dtype before the scale (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return _materialised(normed.astype(x.dtype) * scale.astype(x.dtype))


def residual_rms_norm(h: jax.Array, scale: jax.Array, eps: float, names: tuple) -> tuple[jax.Array, jax.Array]:
    """`(h, rms_norm(h, scale, eps))` for the residual stream h `[B, T, D]`, whose dimensions have
    the logical sharding `names`. Through the kernels where they run: on a GPU (`KERNELS`), h's
    rows split over the mesh only by batch and length (each shard's rows in `shard_map`), and
    shapes `kernel.supports`; else the plain form."""
    use, interpret = _kernel_mode()
    counts = shard_counts(names, h.shape)
    rows = (h.shape[0] // counts[0]) * (h.shape[1] // counts[1])
    if not use or counts[2] != 1 or kernel.supports(rows, h.shape[2], h.dtype) is not None:
        return h, rms_norm(h, scale, eps)
    return _norm(eps, interpret, names, h, scale)


def _kernel_mode() -> tuple[bool, bool]:
    """(run the kernels, in interpret mode)."""
    on_gpu = jax.default_backend() == "gpu"
    if KERNELS == "off" or (KERNELS == "auto" and not on_gpu):
        return False, False
    return True, not on_gpu


def _per_shard(fn, names, h, *args):
    """fn over rows: h `[B, T, D]` and the other `[B, T, ...]` arrays in args flattened to `[B·T,
    ...]` (a `[D]` arg passes as it is), outputs `[B·T, ...]` back to `[B, T, ...]`; per shard of
    the active mesh (its batch and length axes) where h is split."""
    rowwise = [a.ndim >= 2 for a in args]

    def flat(h, *args):
        bl, tl, d = h.shape
        args = [a.reshape((bl * tl,) + a.shape[2:]) if r else a for a, r in zip(args, rowwise)]
        return jax.tree.map(lambda o: o.reshape((bl, tl) + o.shape[1:]), fn(h.reshape(bl * tl, d), *args))

    spec = split_spec(names, h.shape)
    if spec is None:
        return flat(h, *args)
    split = lambda ndim: P(spec[0], spec[1], *([None] * (ndim - 2)))
    out_specs = jax.tree.map(lambda o: split(o.ndim), jax.eval_shape(flat, h, *args))
    in_specs = (split(3),) + tuple(split(a.ndim) if r else P() for a, r in zip(args, rowwise))
    return per_shard(flat, in_specs, out_specs)(h, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _norm(eps, interpret, names, h, scale):
    return _forward(eps, interpret, names, h, scale)[0]


def _forward(eps, interpret, names, h, scale):
    y, rstd = _per_shard(lambda h, s: kernel.forward(h, s, eps=eps, interpret=interpret), names, h, scale)
    return (h, y), rstd


def _fwd(eps, interpret, names, h, scale):
    out, rstd = _forward(eps, interpret, names, h.value, scale.value)
    return out, (h.value, rstd, scale.value, scale.perturbed)


def _bwd(eps, interpret, names, res, cotangents):
    h, rstd, scale, want_d_scale = res
    d_residual, dy = cotangents
    zero = lambda c: isinstance(c, jax.custom_derivatives.SymbolicZero)
    dy = jnp.zeros_like(h) if zero(dy) else dy.astype(h.dtype)
    # The residual path's gradient: none where h has no other use (symbolic zero).
    dres = [] if zero(d_residual) else [d_residual.astype(h.dtype)]
    dh = _per_shard(lambda h, r, s, dy, *dres: kernel.backward(h, r, s, dy, *dres, interpret=interpret),
                    names, h, rstd, scale, dy, *dres)
    if not want_d_scale:  # LoRA: the norms are frozen
        return dh, None
    # Full fine-tuning: the rows' sum of dy·norm(h), one XLA reduction over what the kernel read.
    normed = (h.astype(jnp.float32) * rstd[..., None]).astype(h.dtype)
    return dh, jnp.sum((dy * normed).astype(jnp.float32), axis=(0, 1)).astype(scale.dtype)


_norm.defvjp(_fwd, _bwd, symbolic_zeros=True)
