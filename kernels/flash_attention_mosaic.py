"""Flash attention forward for Hopper through Pallas' Mosaic GPU backend (opt-in, slower so far).

Issue 7's H200 runs put our Triton forward furthest from cuDNN (379 vs 518 TFLOP/s at B4 S4096
H32 D128 causal) and a tile sweep did not move it: Triton decides TMA, wgmma and warp roles
itself, Mosaic GPU lets a kernel place them. This file is the first step there, selected with
`BlockSizes(forward="mosaic")` in `kernels/flash_attention.py`; the backward stays the Triton one.
Checked in Mosaic GPU's interpret mode on CPU (values, log-sum-exp and gradients against the
reference) and, on an H200 (2026-11-30, RESULTS.md), compiled: it agrees with the Triton forward
(5.5e-5 relative) but is slower, 249 vs 390 TFLOP/s at B4 S4096 H32 D128 causal (0.46× cuDNN's
forward; 0.57-0.72× at the GQA shapes). One warpgroup per program, waiting on each wgmma, leaves
the tensor cores idle during the softmax: hence the schedule below.

One warpgroup per program computes a 64-row output tile: Q stays in SMEM, K/V blocks stream
through SMEM with `plgpu.emit_pipeline` (TMA into `stages` buffers), S = Q·Kᵀ and P·V are wgmma's
with float32 accumulators, the online softmax runs in base 2 in registers (P goes back to SMEM
in the input dtype for the second wgmma). Returns (o `[B, S, H, D]`, lse2 `[B, H, S]`, base-2
log-sum-exp) as the Triton forward does. Supports causal or full attention and GQA; not segment
ids, windows, q/kv offsets or lengths that are not a multiple of the tiles (the caller refuses
those). FlashAttention-3's speed also needs two consumer warpgroups ping-ponging softmax against
wgmma and a producer warpgroup (`plgpu.emit_pipeline_warp_specialized`): the next step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_Q = 64  # one warpgroup's wgmma M
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row of a WGMMA-layout tile


def _smem_transforms(dtype, minor: int):
    """Tiling + swizzle for a 2-byte SMEM tile whose minor dimension holds `minor` elements."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, minor * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


@functools.partial(jax.jit, static_argnames=("causal", "scale_log2", "block_kv", "stages", "interpret"))
def mosaic_forward(q, k, v, *, causal: bool, scale_log2: float, block_kv: int = 64, stages: int = 2,
                   interpret: bool = False):
    """(o, lse2) for q `[B, S, H, D]`, k/v `[B, S, KH, D]` (bf16/fp16; S a multiple of 64 and of
    `block_kv`; `scale_log2` = softmax scale · log2 e)."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    if s % BLOCK_Q or s % block_kv or k.shape[1] != s:
        raise ValueError(f"mosaic_forward needs equal q/kv lengths that are multiples of {BLOCK_Q} and "
                         f"block_kv={block_kv}; got {s} and {k.shape[1]}")
    nkv = s // block_kv
    dtype = q.dtype
    tf_d = _smem_transforms(dtype, d)

    def body(q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, q_smem, p_smem, o_smem, lse_smem, q_barrier):
        qi, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        rows = pl.ds(qi * BLOCK_Q, BLOCK_Q)
        plgpu.copy_gmem_to_smem(q_gmem.at[bi, rows, hi, :], q_smem, q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[0])

        def matmul(a_smem, b_smem, shape):
            """a·b by wgmma into a fresh (zeroed) float32 accumulator, read back to registers."""
            def run(acc):
                plgpu.wgmma(acc, a_smem, b_smem)
                plgpu.wgmma_wait(0)
                return acc[...]

            return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

        def kv_step(indices, k_smem, v_smem, carry):
            m_prev, l_prev, o_prev = carry
            (j,) = indices
            scores = matmul(q_smem, k_smem.transpose((1, 0)), (BLOCK_Q, block_kv)) * scale_log2
            if causal:
                q_pos = qi * BLOCK_Q + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 0,
                                                              layout=plgpu.Layout.WGMMA)
                k_pos = j * block_kv + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                                              layout=plgpu.Layout.WGMMA)
                scores = jnp.where(k_pos <= q_pos, scores, -jnp.inf)
            m_new = jnp.maximum(m_prev, scores.max(axis=1))
            alpha = jnp.exp2(m_prev - m_new)
            p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
            l_new = l_prev * alpha + p.sum(axis=1)
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()  # the registers' writes must land before wgmma reads SMEM
            o_new = o_prev * lax.broadcast_in_dim(alpha, (BLOCK_Q, d), [0]) + matmul(p_smem, v_smem, (BLOCK_Q, d))
            return m_new, l_new, o_new

        m0 = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), _ROW)
        l0 = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), _ROW)
        o0 = plgpu.layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), plgpu.Layout.WGMMA)
        # Causal: the key blocks after the query tile's last row are never loaded. Every row sees
        # at least its own key, so m is finite at the end.
        n_steps = (qi * BLOCK_Q + BLOCK_Q + block_kv - 1) // block_kv if causal else nkv
        kv_spec = plgpu.BlockSpec((block_kv, d), lambda j: (j, 0), transforms=tf_d)
        m, l, o = plgpu.emit_pipeline(kv_step, grid=(n_steps,), in_specs=[kv_spec, kv_spec],
                                      max_concurrent_steps=stages, init_carry=(m0, l0, o0))(
            k_gmem.at[bi, :, hi // group, :], v_gmem.at[bi, :, hi // group, :])
        o_smem[...] = (o / lax.broadcast_in_dim(l, (BLOCK_Q, d), [0])).astype(dtype)
        lse_smem[...] = m + jnp.log2(l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[bi, rows, hi, :])
        plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[bi, hi, rows])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, s, h, d), dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((BLOCK_Q, d), dtype, transforms=tf_d),  # q
            plgpu.SMEM((BLOCK_Q, block_kv), dtype, transforms=_smem_transforms(dtype, block_kv)),  # p
            plgpu.SMEM((BLOCK_Q, d), dtype, transforms=tf_d),  # o
            plgpu.SMEM((BLOCK_Q,), jnp.float32),  # lse2
            plgpu.Barrier(num_barriers=1),
        ],
        grid=(s // BLOCK_Q, h, b),
        grid_names=("q", "h", "b"),
        interpret=_interpret_params() if interpret else None,
    )
    return kernel(q, k, v)


def _interpret_params():
    # Mosaic GPU's interpreter (CPU): simulates SMEM, TMA copies, barriers and wgmma.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
