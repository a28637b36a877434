"""Flash attention forward for Hopper through Pallas' Mosaic GPU backend.

`BlockSizes(forward="auto")` (the default) runs it on a Hopper GPU wherever the call fits it (no
segment ids, windows or q/kv offsets; equal lengths that are multiples of 128; head_dim 64 or 128;
bf16/fp16), the Triton forward in `kernels/flash_attention.py` elsewhere; `forward="mosaic"` asks
for it and refuses what it cannot do by name. The backward is the Triton one either way.

Why: the Triton forward stayed at 0.73x cuDNN's (379 vs 518 TFLOP/s at B4 S4096 H32 D128 causal on
an H200) whatever its tiles; Triton decides TMA, wgmma and warp roles itself, Mosaic GPU lets a
kernel place them. History on an H200 (RESULTS.md): one warpgroup waiting on each wgmma, 0.46x
cuDNN; FlashAttention-3's structure (below) with P through SMEM, 0.73x; P from registers with the
output accumulated in place, the causal mask only on diagonal blocks and 128-key blocks, 0.81x; the
grid with heads fastest, **1.05x** (0.97 ms against cuDNN's 1.02).

A program owns 128 query rows and three warpgroups: a producer that streams K/V blocks through
SMEM with TMA (`plgpu.emit_pipeline_warp_specialized`, `stages` buffers, the consumers release each
buffer with a barrier), and two consumers with 64 rows each that run S = Q·Kᵀ and P·V as wgmma's
and the online softmax (base 2) in registers. The consumers take turns at a two-arrival barrier so
that one's softmax overlaps the other's matmuls (compiled only: see `take_turns`); both share each
K/V load. Returns (o `[B, S, H, D]`, lse2 `[B, H, S]`, base-2 log-sum-exp) as the Triton forward
does. Mosaic GPU's interpret mode (the CPU tests) has neither register operands for wgmma nor
accumulating into a live accumulator, so there a step sends P through SMEM into a fresh
accumulator (`kv_step_interpreted`); the compiled step is checked against it and the Triton kernel
on a GPU (`tests/test_flash_attention_mosaic.py` runs compiled there; the benchmark prints errors).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxtune.kernels.mosaic_smem import interpret_params, smem_transforms

BLOCK_Q = 64  # one warpgroup's wgmma M
TILE_Q = 2 * BLOCK_Q  # query rows per program: one BLOCK_Q per consumer warpgroup
# Keys per step. At D64 128 keys ran the 1B training shape's forward in 0.229 ms against 0.299 with
# 64 (H200); at D128 they were level. SMEM at D128: Q 32 KB + 2 stages of K and V 128 KB.
BLOCK_KV = 128
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row of a WGMMA-layout tile


@functools.partial(jax.jit, static_argnames=("causal", "scale_log2", "block_kv", "stages", "interpret"))
def mosaic_forward(q, k, v, *, causal: bool, scale_log2: float, block_kv: int = BLOCK_KV, stages: int = 2,
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
    tf_d = smem_transforms(dtype, d)

    def jaxtune_flash_fwd_mosaic(q_gmem, k_gmem, v_gmem, o_gmem, lse_gmem, q_smem2, lse_smem2, q_barriers, turn,
                                 *p_smem_interpreted):
        qi, hi, bi = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        if causal:  # heaviest query tiles first, to shorten the tail
            qi = s // TILE_Q - 1 - qi
        wg = lax.axis_index("wg")  # 0, 1: consumers; 2: the pipeline's producer (TMA loads)
        row0 = qi * TILE_Q + wg * BLOCK_Q  # this consumer's first query row

        def take_turns():
            # Both consumers meet here (a 2-arrival barrier), twice a step: while Q·Kᵀ runs and
            # before P·V. Starting half a step apart, one warpgroup's softmax then runs while the
            # other's wgmma's hold the tensor cores (FlashAttention-3's "ping-pong" schedule). It orders work and changes no value. Mosaic GPU's interpreter
            # (jax 0.11.2) hung on a second run of a jitted forward+backward with it (forward-only
            # repeats ran), so interpret mode leaves the consumers unsynchronised.
            if interpret:
                return
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def matmul(a_smem, b_smem, shape):
            """a·b by wgmma into a fresh (zeroed) float32 accumulator, read back to registers."""
            def run(acc):
                plgpu.wgmma(acc, a_smem, b_smem)
                plgpu.wgmma_wait(0)
                return acc[...]

            return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))

        def masked(scores, j):
            """The causal mask, only on key blocks that reach past this consumer's first row (the
            others are fully visible: the iota/compare/select per logit is skipped there)."""
            def apply(scores):
                q_pos = row0 + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 0,
                                                      layout=plgpu.Layout.WGMMA)
                k_pos = j * block_kv + plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                                              layout=plgpu.Layout.WGMMA)
                return jnp.where(k_pos <= q_pos, scores, -jnp.inf)

            if not causal:
                return scores
            return lax.cond(j * block_kv + block_kv - 1 > row0, apply, lambda s: s, scores)

        def softmax(scores, m_prev, l_prev, acc):
            """Online softmax in base 2 (FlashAttention-2 §3.1) with the scale folded into one FMA
            per logit: P (unnormalised), the new running max and sum, acc rescaled."""
            m_new = jnp.maximum(m_prev, scores.max(axis=1) * scale_log2)
            alpha = jnp.exp2(m_prev - m_new)
            p = jnp.exp2(scores * scale_log2 - lax.broadcast_in_dim(m_new, scores.shape, [0]))
            l_new = l_prev * alpha + p.sum(axis=1)
            return p, m_new, l_new, acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def kv_step(indices, k_smem, v_smem, k_consumed, v_consumed, carry):
            """Compiled: FlashAttention-3's consumer step. Q·Kᵀ is issued, then the consumers
            meet while it runs (the other one's P·V holds the tensor cores); P stays in registers
            as the A operand of P·V, which accumulates into the running output in place."""
            m_prev, l_prev, acc = carry
            (j,) = indices

            def qk(s_acc):
                plgpu.wgmma(s_acc, q_smem2.at[wg], k_smem.transpose((1, 0)))
                take_turns()
                return s_acc[...]

            scores = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed)  # the producer may refill this K buffer
            p, m_new, l_new, acc = softmax(masked(scores, j), m_prev, l_prev, acc)
            p16 = p.astype(dtype)
            # Keeps the softmax's results ahead of the meeting below (jax's own Mosaic attention
            # found the order matters for speed).
            acc, l_new, m_new, p16 = lax.optimization_barrier((acc, l_new, m_new, p16))
            take_turns()

            def pv(o_acc):
                plgpu.wgmma(o_acc, p16, v_smem)

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed)
            return m_new, l_new, acc

        def kv_step_interpreted(indices, k_smem, v_smem, k_consumed, v_consumed, carry):
            """The same step in the form Mosaic GPU's interpret mode runs (CPU tests): it has
            neither register operands nor accumulating into a live accumulator, so P goes
            through SMEM and P·V into a fresh accumulator; no meetings (see take_turns)."""
            m_prev, l_prev, acc = carry
            (j,) = indices
            scores = matmul(q_smem2.at[wg], k_smem.transpose((1, 0)), (BLOCK_Q, block_kv))
            plgpu.barrier_arrive(k_consumed)
            p, m_new, l_new, acc = softmax(masked(scores, j), m_prev, l_prev, acc)
            p_smem = p_smem_interpreted[0].at[wg]
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()  # the registers' writes must land before wgmma reads SMEM
            acc = acc + matmul(p_smem, v_smem, (BLOCK_Q, d))
            plgpu.barrier_arrive(v_consumed)
            return m_new, l_new, acc

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
            kv_step_interpreted if interpret else kv_step, grid=(n_steps,), memory_registers=40,
            in_specs=[kv_spec, kv_spec], max_concurrent_steps=stages, num_compute_wgs=2, wg_axis="wg",
            manual_consumed_barriers=True, compute_context=consumer)
        pipeline(k_gmem.at[bi, :, hi // group, :], v_gmem.at[bi, :, hi // group, :])

    kernel = plgpu.kernel(
        jaxtune_flash_fwd_mosaic,  # named after what it is, for compiler dumps and profiles
        out_type=(jax.ShapeDtypeStruct((b, s, h, d), dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((2, BLOCK_Q, d), dtype, transforms=tf_d),  # q, then o, per consumer
            plgpu.SMEM((2, BLOCK_Q), jnp.float32),  # lse2
            plgpu.Barrier(num_barriers=2),  # q loaded, per consumer
            plgpu.Barrier(num_arrivals=2),  # the consumers' turns
        ] + ([plgpu.SMEM((2, BLOCK_Q, block_kv), dtype, transforms=smem_transforms(dtype, block_kv))]
             if interpret else []),  # p, interpret mode only
        # Heads along the fastest grid axis: the programs in flight work on the same query tile of
        # neighbouring heads (equal work per program under a causal mask; with GQA, the same K/V).
        # On an H200 this order ran the headline forward in 0.97 ms, against 1.28 ms with query
        # tiles fastest (RESULTS.md, 2026-11-30 fifth session).
        grid=(h, s // TILE_Q, b),
        grid_names=("h", "q", "b"),
        num_threads=3,
        thread_name="wg",
        # approx_math: exp2 as the one-instruction ex2.approx, as in the Triton kernels.
        compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )
    return kernel(q, k, v)

