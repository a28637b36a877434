"""A plain LoRA projection, and the residual added after it, through one Hopper kernel
(kernels/lora_matmul_mosaic.py) forward and backward:

    forward:  out = residual + x@W + xa@sB          xa = x@A, sB = s·B
    backward: dx  = dy@Wᵀ + dxa@Aᵀ                  dxa = dy@sBᵀ (the same kernel, transposed)
              dA  = xᵀ@dxa,  dsB = xaᵀ@dy,  dresidual = dy

What XLA runs for the same (benchmarks/RESULTS.md, eighteenth round): cuBLAS for x@W, a Triton GEMM
fusion for xa@sB and a pass adding them (with the residual), and in the backward two GEMMs and a
pass adding them; no way of writing the sums puts them in cuBLAS's epilogue. The kernel's
accumulator takes the adapter's product as one more K step and its epilogue the residual.

Taken (`takes`) for plain LoRA over a dense base without dropout (the adapter's input must be x
itself for dx's one product), where the kernel's shape rules hold and the activations are not split
over a mesh (a kernel call has no sharding rule): on a Hopper GPU with `KERNEL = "auto"`, anywhere
in Mosaic GPU's interpret mode with `"interpret"` (CPU tests); elsewhere lora.py's XLA form runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxtune.kernels import lora_matmul_mosaic as kernel
from jaxtune.kernels.activation_math import ACTIVATIONS
from jaxtune.kernels.mosaic_smem import on_hopper
from jaxtune.sharding import active_mesh

# "auto": compiled on a Hopper GPU; "off": never; "interpret": Mosaic GPU's interpret mode anywhere.
KERNEL = "auto"
CLUSTER = 1  # CTAs per cluster (the kernel's `cluster`)
# Products whose K (x's width) is at least this take the kernel's cooperative 128-row tiles (3
# stages) instead of ping-pong's 64-row ones; None: never. Measured on an H200 at the 1B step's
# shapes (RESULTS, twentieth round): cooperative faster for down_proj (K 8192: 373 against 398 µs),
# q/k/v and o_proj's backward, level for o_proj's forward (K 2048: 111 against 109).
COOPERATIVE_K: int | None = 2048
# A gated MLP's down_proj backward and the activation's backward as one kernel
# (`activation_grad_product`; lora_gated_down's joint backward takes it where
# `takes_activation_grad`): dh = dy@Wdᵀ + dha@Adᵀ stays in the accumulator, never written and read
# back. False: cuBLAS for dy@Wdᵀ, then the activation's backward kernel.
ACTIVATION_GRAD = True


def takes(tokens: int, in_features: int, out_features: int, rank: int, dtype) -> bool:
    """Whether `projection` runs the kernel for `[tokens, in] @ [in, out]` with an adapter of `rank`."""
    if KERNEL == "off" or (KERNEL == "auto" and not on_hopper()):
        return False
    mesh = active_mesh()
    if mesh is not None and mesh.size > 1:
        return False
    k = kernel.ADAPTER_K
    return (rank <= k and kernel.supports(tokens, in_features, out_features, k, dtype, CLUSTER) is None
            and kernel.supports(tokens, out_features, in_features, k, dtype, CLUSTER) is None)  # the backward's


def projection(x, a, w, sb, residual=None):
    """`residual + x@W + (x@A)@sB` for x `[T, in]`, A `[in, r]`, W `[in, out]`, sB `[r, out]` (s·B),
    residual `[T, out]` or None; one dtype throughout (float32 accumulation), the result in it."""
    return _projection(x, a, w, sb, residual)


def kernel_product(x, xa, w, sb, residual=None, *, transpose: bool = False):
    """The kernel's `residual + x@W + xa@sB` (`transpose`: `x@Wᵀ + xa@sBᵀ` from W `[out, in]`, sB
    `[out, r]`) with xa and sB zero-padded to its adapter K. Not differentiable: for the custom
    VJPs that call it (here, and lora_gated_down's down_proj). Check `takes` first."""
    t, k = x.shape
    n = w.shape[0] if transpose else w.shape[1]
    return kernel.lora_matmul(x, w, _pad_k(xa, 1), _pad_k(sb, 1 if transpose else 0), residual, transpose=transpose,
                              **_tiling(t, k, n, x.dtype))


def takes_activation_grad(tokens: int, mlp: int, hidden: int, rank: int, chunk: int, dtype, hidden_act: str) -> bool:
    """Whether `activation_grad_product` runs for a LoRA down_proj `[tokens, mlp] @ [mlp, hidden]` of
    `rank` after a gated activation whose gate and up are held in chunks of `chunk` columns."""
    return (ACTIVATION_GRAD and hidden_act in ACTIVATIONS and chunk % kernel.STORE_N == 0 and mlp % chunk == 0
            and takes(tokens, mlp, hidden, rank, dtype))  # takes' shape rules hold for ping-pong's tiles


def activation_grad_product(dy, dha, w, a, gate_up, *, hidden_act: str, chunk: int):
    """gate_up's gradient `[T, 2F]` (the joint layout, chunks of `chunk`) through `h = act(g)·u` and a
    LoRA down_proj, from dy `[T, D]`, dha = dy@sBᵀ `[T, r]`, W `[F, D]` and A `[F, r]` as stored: the
    kernel's `lora_matmul_activation_grad`, dh = dy@Wᵀ + dha@Aᵀ kept in its accumulator. Not
    differentiable (lora_gated_down's backward calls it). Check `takes_activation_grad` first.

    Always ping-pong tiles, whatever K: the epilogue (g and u read, dg and du written) is heavy, and
    ping-pong runs it under the other consumer's main loop. On an H200 at the 1B step's shapes
    (RESULTS, twenty-first round): 467 µs against cooperative tiles' 489 and cuBLAS's dy@Wᵀ plus
    the activation's backward kernel's 523–538."""
    return kernel.lora_matmul_activation_grad(dy, w, _pad_k(dha, 1), _pad_k(a, 1), gate_up, hidden_act=hidden_act,
                                              chunk=chunk, interpret=KERNEL == "interpret")


def _tiling(t: int, k: int, n: int, dtype) -> dict:
    """The kernel's tiling arguments for `[t, k] @ [k, n]`: cooperative tiles (3 stages) from
    COOPERATIVE_K on, else ping-pong's (4 stages, CLUSTER)."""
    cooperative = (COOPERATIVE_K is not None and k >= COOPERATIVE_K
                   and kernel.supports(t, k, n, kernel.ADAPTER_K, dtype, cooperative=True) is None)
    return {"cooperative": cooperative, "stages": 3 if cooperative else 4, "cluster": 1 if cooperative else CLUSTER,
            "interpret": KERNEL == "interpret"}


def _pad_k(array, axis: int):
    """`array` with its rank axis zero-padded to the kernel's adapter K."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, kernel.ADAPTER_K - array.shape[axis])
    return jnp.pad(array, widths)


def _forward(x, a, w, sb, residual):
    xa = jnp.einsum("ti,ir->tr", x, a, preferred_element_type=x.dtype)
    return kernel_product(x, xa, w, sb, residual), xa


def _input_grads(x, a, w, sb, xa, dy, want_dw):
    dxa = jnp.einsum("to,ro->tr", dy, sb, preferred_element_type=x.dtype)
    dx = kernel_product(dy, dxa, w, a, transpose=True)  # dy@Wᵀ + dxa@Aᵀ
    da = jnp.einsum("ti,tr->ir", x, dxa, preferred_element_type=jnp.float32).astype(a.dtype)
    dsb = jnp.einsum("tr,to->ro", xa, dy, preferred_element_type=jnp.float32).astype(sb.dtype)
    dw = jnp.einsum("ti,to->io", x, dy, preferred_element_type=jnp.float32).astype(w.dtype) if want_dw else None
    return dx, da, dw, dsb


@jax.custom_vjp
def _projection(x, a, w, sb, residual):
    return _forward(x, a, w, sb, residual)[0]


def _fwd(x, a, w, sb, residual):
    out, xa = _forward(x.value, a.value, w.value, sb.value, None if residual is None else residual.value)
    return out, (x.value, a.value, w.value, sb.value, xa, w.perturbed, residual is not None)


def _bwd(res, dy):
    *inputs, want_dw, has_residual = res
    return (*_input_grads(*inputs, dy, want_dw), dy if has_residual else None)


_projection.defvjp(_fwd, _bwd, symbolic_zeros=True)


def flat_shapes(x_shape: tuple[int, ...], w_shape: tuple[int, ...], in_ndim: int) -> tuple[int, int, int]:
    """(tokens, in, out) of a projection of x `[*lead, *in]` by a kernel `[*in, *out]` whose first
    `in_ndim` dimensions are the input side."""
    lead = len(x_shape) - in_ndim
    return math.prod(x_shape[:lead]), math.prod(w_shape[:in_ndim]), math.prod(w_shape[in_ndim:])

