"""A LoRA projection's two products as one matmul: `x@W + xa@sB = [x | xa] @ [W ; sB]`.

Computed as two matmuls and an add (what autodiff of the plain form gives), a LoRA projection
costs passes over its `[tokens, out]` output that the frozen matmul alone does not: the adapter's
product `xa@sB` is written, and read again by the add (or by whatever XLA fuses the add into), and
the backward reads the output's gradient `dy` twice more, for `dxa = dy@sBᵀ` and `dsB = xaᵀ@dy`.
On a projection that widens its input (an MLP's gate and up: 2048 → 8192 features on
Llama-3.2-1B) those passes over the wide side can cost more than copying the narrow input and the
kernel (`pays_off` says when):

- forward: one matmul over the concatenated operands `[x | xa]` (`[tokens, in + r]`) and
  `[W ; sB]` (`[in + r, *out]`), its float32 accumulator holding both terms before the single
  rounding to the output dtype;
- backward: one matmul `dy @ [W ; sB]ᵀ` gives `[dx | dxa]` (the gradient reaching x through W,
  and xa's), reading `dy` once for both; `dsB = xaᵀ@dy` is the only other pass over `dy`.

`xa = dropout(x)@A` and `sB = s·B` are computed by the caller, so autodiff carries their
gradients to A, B and x as usual. The frozen `W` gets no gradient matmul unless it is being
differentiated (symbolic zeros tell).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxtune.sharding import shard_counts


def pays_off(spec: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> bool:
    """Whether `fused_lora_product` applies to einsum `spec` and is worth it here.

    It applies when the kernel has one input dimension, the last of x's. Its gain is passes over
    `[tokens, out]` (≈ 4 per projection: 0.14 ms per gate/up projection on the 1B profile); its
    cost is concatenating the frozen kernel with sB each time it is used (forward, backward, and the
    recomputed forward under remat: passes over `[in, out]`) and copying x. So it pays when the
    output is wide (at least twice the input) and each device's tokens per step are many against
    the input width. Measured on an H200 (benchmarks/RESULTS.md): Llama-3.2-1B, 8192 tokens per
    step over 2048 inputs, +1.7%; Llama-3-8B, 4096 tokens over 4096 inputs, −1.5%. The rule below
    (tokens ≥ 4 × inputs) takes the first and leaves the second on the two-product path.
    """
    x_s, w_s = spec.split("->")[0].split(",")
    if not (w_s[0] == x_s[-1] and w_s[0] not in w_s[1:] and x_s.count(w_s[0]) == 1):
        return False
    in_features, out_features = x_shape[-1], math.prod(w_shape[1:])
    tokens = math.prod(x_shape[:-1])
    if len(x_shape) == 3:  # [batch, length, features]: the tokens of one device under the active sharding
        tokens //= math.prod(shard_counts(("act_batch", "act_length", "act_embed"), x_shape)[:2])
    return out_features >= 2 * in_features and tokens >= 4 * in_features


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def fused_lora_product(spec: str, x: jax.Array, xa: jax.Array, w, sb: jax.Array, chunk: int | None = None) -> jax.Array:
    """`x@W + xa@sB` by einsum `spec` (x's last dimension contracted with W's first), in x's dtype
    with float32 accumulation. x `[*lead, in]`, xa `[*lead, r]`, W `[in, *out]`, sB `[r, *out]`,
    all in one dtype.

    With `chunk`, w is a tuple of kernels `[in, F]` and W their outputs side by side chunk by chunk,
    `[in, F/chunk, n·chunk]` (chunk j holds columns `[j·chunk, (j+1)·chunk)` of each part in turn):
    formed inside, so that the backward keeps the parts (parameters, alive anyway) rather than a
    copy of their interleaving per layer."""
    return _product(spec, x, xa, w, sb, chunk)


def _augmented_kernel(w, sb, chunk):
    """`[W ; sB]`: `[in + r, *out]`. Formed again in the backward rather than kept from the forward,
    which would hold a copy of every fused kernel from each layer's forward to its backward.

    With `chunk`, `[parts interleaved ; sB]` as a sum of zero-padded pieces: one elementwise pass
    writing the result. The same as two nested concatenations, which XLA (on CPU at least) ran as
    two passes, writing the interleaved parts out first."""
    if chunk is None:
        return jnp.concatenate([w, sb], axis=0)
    rows, r, n = w[0].shape[0], sb.shape[0], len(w)
    zero = jnp.zeros((), sb.dtype)
    out = jax.lax.pad(sb, zero, [(rows, 0, 0)] + [(0, 0, 0)] * (sb.ndim - 1))
    for i, part in enumerate(w):
        chunked = part.reshape(rows, part.shape[1] // chunk, chunk)
        out = out + jax.lax.pad(chunked, zero, [(0, r, 0), (0, 0, 0), (i * chunk, (n - 1 - i) * chunk, 0)])
    return out


def _product(spec, x, xa, w, sb, chunk):
    x_aug = jnp.concatenate([x, xa], axis=-1)
    return jnp.einsum(spec, x_aug, _augmented_kernel(w, sb, chunk), preferred_element_type=x.dtype)


def _fwd(spec, x, xa, w, sb, chunk):
    want_dw = any(p.perturbed for p in jax.tree.leaves(w, is_leaf=lambda p: hasattr(p, "perturbed")))
    x, xa, sb = x.value, xa.value, sb.value
    w = jax.tree.map(lambda p: p.value, w, is_leaf=lambda p: hasattr(p, "perturbed"))
    return _product(spec, x, xa, w, sb, chunk), (x, xa, w, sb, want_dw)


def _bwd(spec, chunk, residuals, dy):
    x, xa, w, sb, want_dw = residuals
    inputs, out_s = spec.split("->")
    x_s, w_s = inputs.split(",")
    # [dx | dxa] in one matmul: dy is read once for both.
    d_aug = jnp.einsum(f"{out_s},{w_s}->{x_s}", dy, _augmented_kernel(w, sb, chunk), preferred_element_type=x.dtype)
    dx, dxa = d_aug[..., :x.shape[-1]], d_aug[..., x.shape[-1]:]
    lead = x_s[:-1]
    r = w_s[0]  # the contracted letter stands for the rank too: sB is [r, *out] like W is [in, *out]
    dsb = jnp.einsum(f"{lead}{r},{out_s}->{w_s}", xa, dy, preferred_element_type=jnp.float32).astype(sb.dtype)
    dw = None
    if want_dw:
        dw = jnp.einsum(f"{x_s},{out_s}->{w_s}", x, dy, preferred_element_type=jnp.float32)
        if chunk is None:
            dw = dw.astype(w.dtype)
        else:  # back to each part's [in, F]
            dw = tuple(dw[..., i * chunk:(i + 1) * chunk].reshape(p.shape).astype(p.dtype) for i, p in enumerate(w))
    elif chunk is not None:
        dw = tuple(None for _ in w)
    return dx, dxa, dw, dsb


fused_lora_product.defvjp(_fwd, _bwd, symbolic_zeros=True)
