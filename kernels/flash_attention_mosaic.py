"""Flash attention forward for Hopper through Pallas' Mosaic GPU backend (opt-in, not the default).

Issue 7's H200 runs put our Triton forward furthest from cuDNN (379 vs 518 TFLOP/s at B4 S4096
H32 D128 causal) and a tile sweep did not move it: Triton decides TMA, wgmma and warp roles
itself, Mosaic GPU lets a kernel place them. Selected with `BlockSizes(forward="mosaic")` in
`kernels/flash_attention.py`; the backward stays the Triton one. The first version, one
warpgroup per 64-row tile waiting on each wgmma, ran on an H200 (2026-11-30, RESULTS.md): it
agreed with the Triton forward (5.5e-5 relative) but was slower, 249 vs 390 TFLOP/s at B4 S4096
H32 D128 causal (0.46× cuDNN's forward; 0.57-0.72× at the GQA shapes): the tensor cores idled
during every softmax.

This version (written after that run; checked in Mosaic GPU's interpret mode on CPU, not yet run on
a GPU) has FlashAttention-3's structure. A program owns 128 query rows and three warpgroups: a
producer that streams K/V blocks through SMEM with TMA (`plgpu.emit_pipeline_warp_specialized`,
`stages` buffers, the consumers release each buffer with a barrier), and two consumers with 64 rows
each that run S = Q·Kᵀ and P·V as wgmma's and the online softmax (base 2) in registers. The
consumers take turns at a two-arrival barrier so that one's softmax overlaps the other's matmuls
(compiled only: see `take_turns`). Both consumers share each K/V load (half the loads per query row
of the one-warpgroup version). Returns (o `[B, S, H, D]`, lse2 `[B, H, S]`, base-2 log-sum-exp) as
the Triton forward does. Supports causal or full attention and GQA; not segment ids, windows, q/kv
offsets or lengths that are not a multiple of the tiles (the caller refuses those). Not yet done:
issuing the next block's Q·Kᵀ before this block's softmax inside a warpgroup, P·V accumulated in
place with P from registers (both outside what the interpreter runs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_Q = 64  # one warpgroup's wgmma M
TILE_Q = 2 * BLOCK_Q  # query rows per program: one BLOCK_Q per consumer warpgroup
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row of a WGMMA-layout tile


def _smem_transforms(dtype, minor: int):
    """Tiling + swizzle for a 2-byte SMEM tile whose minor dimension holds `minor` elements."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, minor * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


@functools.partial(jax.jit, static_argnames=("causal", "scale_log2", "block_kv", "stages", "interpret"))
def mosaic_forward(q, k, v, *, causal: bool, scale_log2: float, block_kv: int = 64, stages: int = 2,
                   interpret: bool = False):
    """(o, lse2) for q `[B, S, H, D]`, k/v `[B, S, KH, D]` (bf16/fp16; S a multiple of TILE_Q and
    of `block_kv`; `scale_log2` = softmax scale · log2 e)."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    if s % TILE_Q or s % block_kv or k.shape[1] != s:
        raise ValueError(f"mosaic_forward needs equal q/kv lengths that are multiples of {TILE_Q} and "
                         f"block_kv={block_kv}; got {s} and {k.shape[1]}")
    nkv = s // block_kv
    dtype = q.dtype
    tf_d = _smem_transforms(dtype, d)

    def body(q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, q_smem2, p_smem2, lse_smem2, q_barriers, turn):
        qi, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        wg = lax.axis_index("wg")  # 0, 1: consumers; 2: the pipeline's producer (TMA loads)
        row0 = qi * TILE_Q + wg * BLOCK_Q  # this consumer's first query row

        def take_turns():
            # Both consumers meet here (a 2-arrival barrier); placed between the matmuls and the
            # softmax of each step, it staggers them by half a step, so that one warpgroup's
            # softmax runs while the other's wgmma's hold the tensor cores (FlashAttention-3's
            # "ping-pong" schedule). It orders work and changes no value. Mosaic GPU's interpreter
            # (jax 0.11.2) hung on a second run of a jitted forward+backward with it (forward-only
            # repeats ran), so interpret mode leaves the consumers unsynchronised.
            if interpret:
                return
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def matmul(a_smem, b_smem, shape):
            """a·b by wgmma into a fresh (zeroed) float32 accumulator, read back to registers.
            (Mosaic GPU's interpret mode, which the CPU tests run, has neither accumulating into
            a live accumulator nor register operands, so P goes through SMEM.)"""
            def run(acc):
                plgpu.wgmma(acc, a_smem, b_smem)
                plgpu.wgmma_wait(0)
                return acc[...]

            return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

        def kv_step(indices, k_smem, v_smem, k_consumed, v_consumed, carry):
            m_prev, l_prev, o_prev = carry
            (j,) = indices
            scores = matmul(q_smem2.at[wg], k_smem.transpose((1, 0)), (BLOCK_Q, block_kv)) * scale_log2
            plgpu.barrier_arrive(k_consumed)  # the producer may refill this K buffer
            take_turns()
            if causal:
                q_pos = row0 + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 0,
                                                      layout=plgpu.Layout.WGMMA)
                k_pos = j * block_kv + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                                              layout=plgpu.Layout.WGMMA)
                scores = jnp.where(k_pos <= q_pos, scores, -jnp.inf)
            m_new = jnp.maximum(m_prev, scores.max(axis=1))
            alpha = jnp.exp2(m_prev - m_new)
            p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
            l_new = l_prev * alpha + p.sum(axis=1)
            p_smem = p_smem2.at[wg]
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()  # the registers' writes must land before wgmma reads SMEM
            take_turns()
            o_new = o_prev * lax.broadcast_in_dim(alpha, (BLOCK_Q, d), [0]) + matmul(p_smem, v_smem, (BLOCK_Q, d))
            plgpu.barrier_arrive(v_consumed)
            return m_new, l_new, o_new

        def consumer(pipeline):
            q_smem = q_smem2.at[wg]
            plgpu.copy_gmem_to_smem(q_gmem.at[bi, pl.ds(row0, BLOCK_Q), hi, :], q_smem, q_barriers.at[wg])
            plgpu.barrier_wait(q_barriers.at[wg])
            m0 = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), _ROW)
            l0 = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), _ROW)
            o0 = plgpu.layout_cast(jnp.zeros((BLOCK_Q, d), jnp.float32), plgpu.Layout.WGMMA)
            pl.when(wg == 1)(take_turns)  # consumer 1 starts half a step behind consumer 0 ...
            m, l, o = pipeline((m0, l0, o0))
            pl.when(wg == 0)(take_turns)  # ... so consumer 0 owes one meeting at the end
            q_smem[...] = (o / lax.broadcast_in_dim(l, (BLOCK_Q, d), [0])).astype(dtype)  # O reuses Q's SMEM
            lse_smem = lse_smem2.at[wg]
            lse_smem[...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_gmem.at[bi, pl.ds(row0, BLOCK_Q), hi, :])
            plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[bi, hi, pl.ds(row0, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

        # Causal: the key blocks after the tile's last row are never loaded (both consumers walk
        # the same blocks; consumer 0's share of the diagonal is masked). Every row sees at least
        # its own key, so m is finite at the end.
        n_steps = (qi * TILE_Q + TILE_Q + block_kv - 1) // block_kv if causal else nkv
        kv_spec = plgpu.BlockSpec((block_kv, d), lambda j: (j, 0), transforms=tf_d)
        pipeline = plgpu.emit_pipeline_warp_specialized(
            kv_step, grid=(n_steps,), memory_registers=40, in_specs=[kv_spec, kv_spec],
            max_concurrent_steps=stages, num_compute_wgs=2, wg_axis="wg",
            manual_consumed_barriers=True, compute_context=consumer)
        pipeline(k_gmem.at[bi, :, hi // group, :], v_gmem.at[bi, :, hi // group, :])

    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((b, s, h, d), dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((2, BLOCK_Q, d), dtype, transforms=tf_d),  # q, then o, per consumer
            plgpu.SMEM((2, BLOCK_Q, block_kv), dtype, transforms=_smem_transforms(dtype, block_kv)),  # p
            plgpu.SMEM((2, BLOCK_Q), jnp.float32),  # lse2
            plgpu.Barrier(num_barriers=2),  # q loaded, per consumer
            plgpu.Barrier(num_arrivals=2),  # the consumers' turns
        ],
        grid=(s // TILE_Q, h, b),
        grid_names=("q", "h", "b"),
        num_threads=3,
        thread_name="wg",
        # approx_math: exp2 as the one-instruction ex2.approx, as in the Triton kernels.
        compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params() if interpret else None,
    )
    return kernel(q, k, v)


def _interpret_params():
    # Mosaic GPU's interpreter (CPU): simulates SMEM, TMA copies, barriers and wgmma.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
