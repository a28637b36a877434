"""A gated MLP's LoRA gate/up projections and its activation as one Mosaic GPU (Hopper) kernel:
`g = x@Wg + xa@sBg`, `u = x@Wu + xa@sBu`, written side by side chunk by chunk (the `[T, F/c, 2c]`
layout of `jaxtune/lora_gated_down.py`'s JOINT), and `h = act(g)·u`, all in x's dtype.

Why (issue 9, benchmarks/RESULTS.md): on the 1B LoRA step the board runs at its power limit, so a
step's time follows its energy, and the passes between the matmuls are the part of that energy that
can go without changing the arithmetic. Around the joint gate/up matmul XLA runs the activation as
a pass of its own that reads g and u back to write h (105 µs per layer in the step), and copies
`[x | xa]` for cuBLAS. Here the frozen kernels and the adapters stay separate operands (the
adapters' product is one more K step into the same float32 accumulators) and h is formed from the
tiles of g and u while they are in registers.

Measured on an H200 (RESULTS, nineteenth round), at the 1B step's shapes: 758–772 µs in isolation
against 680–718 for cuBLAS's GEMM alone and 866–956 for XLA's form; in the training step +0.2% and
+1.0% tokens/s (interleaved) and 0.64 GiB less peak memory. What keeps it from cuBLAS's time is
not known yet: neither one wgmma of N = 256 from a contiguous `[W ; sB]` tile (816 µs) nor
128-row tiles (840 µs) nor more ring stages (5: 861 µs) helped; the tile order did (bands
of 32 token tiles: 759–772 against 797–802 µs for 16). cuBLAS's kernel there runs 2-CTA clusters
with one operand multicast; `cluster=2` does the same here, and measured slower (805–859 µs against
786–807 for one CTA, RESULTS, twentieth round).

Schedule: ping-pong. The first version of this kernel (fifteenth round) had both consumer
warpgroups work on one 128 × 256 tile and store it together, so the tensor cores idled through
every epilogue: in the step it took 882 µs where cuBLAS's two GEMMs took 728. Here each consumer
owns whole tiles of its own (64 token rows × 128 columns of g and the same 128 of u: two 64 × 128
float32 accumulators, 128 registers a thread) and the two take the program's tiles in turn. One
producer warpgroup streams every K step of every tile through one ring of `stages` SMEM buffers,
in tile order, so the ring itself staggers the consumers: the second starts its main loop as the
first finishes its own, and one's epilogue (activation, six stores) runs under the other's
wgmma's, as in cuBLAS's ping-pong kernels.

Each ring slot has one "filled" barrier per consumer (a barrier's phase is tracked by the threads
that wait on it, so each consumer waits only on barriers that are filled for it alone) and one
"consumed" barrier that only the producer waits on.

The adapters' operands come padded to a K of 64 (`ADAPTER_K`): wgmma's A operand lowers here only
with 128-byte swizzled rows (jax 0.11.2: ranks 16 and 32 fail Mosaic GPU's layout inference), so
the caller passes both adapters' inputs side by side, `xa = x@[A_gate | A_up | 0]`, and sB in the
joint layout with the rows padded (block-diagonal: gate's rows reach only gate's columns). That
step is loaded into the same ring slots as the main loop's, as its last K step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxtune.kernels.activation_math import ACTIVATIONS, activation
from jaxtune.kernels import mosaic_warp_specialized as ws
from jaxtune.kernels.mosaic_smem import smem_transforms

TILE_M = 64  # token rows per tile (one consumer's wgmma rows)
TILE_N = 128  # columns of g (and the same of u) per tile, each in an accumulator of its own
BLOCK_K = 64  # one 128-byte swizzle row of bf16
ADAPTER_K = 64  # the adapters' K, padded (see the module docstring)
STORE_N = 64  # columns per output store (a 64 × 64 tile through a consumer's store slots)
TILE_BAND = 32  # token tiles per band of the tile order (see tile_at; 8 to 64 measured, RESULTS)
CONSUMERS = ws.CONSUMERS


def supports(tokens: int, hidden: int, mlp: int, chunk: int, adapter_k: int, dtype, hidden_act: str,
             cluster: int = 1) -> str | None:
    """None where the kernel takes these shapes (`chunk`: columns of g, then of u, per chunk of the
    joint layout; `adapter_k`: xa's width, both adapters' ranks with padding; `cluster`: CTAs per
    cluster), else why not (one line)."""
    if hidden_act not in ACTIVATIONS:
        return f"activation {hidden_act!r} (one of {ACTIVATIONS})"
    if adapter_k != ADAPTER_K:
        return (f"adapter K = {adapter_k}: the kernel takes one K step of {ADAPTER_K} "
                f"(ranks up to {ADAPTER_K // 2} each)")
    multiples = (("tokens", tokens, TILE_M), ("hidden", hidden, BLOCK_K), ("chunk", chunk, TILE_N), ("mlp", mlp, chunk))
    return ws.shape_problem(dtype, multiples, tokens // TILE_M, cluster)


@functools.partial(jax.jit, static_argnames=("hidden_act", "chunk", "stages", "store_slots", "cluster", "programs",
                                             "interpret"))
def gate_up_activation(x, xa, w_gate, w_up, sb, *, hidden_act: str, chunk: int, stages: int = 4, store_slots: int = 1,
                       cluster: int = 1, programs: int | None = None, interpret: bool = False):
    """(gu `[T, 2F]`, h `[T, F]`) for x `[T, D]`, xa `[T, K]` (both adapters' x@A, dropout applied,
    padded: see the module docstring), w_gate/w_up `[D, F]` (frozen), sb `[K, 2F]` (s·B in the joint
    layout: columns `[j·2c, j·2c + c)` gate's chunk j, the next c up's). gu is g and u in that
    layout (reshaped to `[T, F/c, 2c]` it is `lora_gated_down.JOINT`'s array); one dtype throughout,
    float32 accumulation, h = act(g)·u computed in float32 from the rounded g and u (as the unfused
    model does). `programs`: how many persistent programs share the tiles (default: one per SM; 3
    in interpret mode, so the CPU tests walk several tiles per program and both consumers).
    `cluster` 2: programs run in pairs (a CTA cluster) on vertically adjacent tiles, each loading half
    of the kernels' tiles and multicasting it to both (cuBLAS's `2x1` kernels do this), so each
    pair reads them from L2 once (measured slower at the 1B shapes)."""
    t, d = x.shape
    f = w_gate.shape[1]
    r = xa.shape[1]
    why = supports(t, d, f, chunk, r, x.dtype, hidden_act, cluster)
    if why is not None:
        raise ValueError(f"gate_up_activation does not take these shapes: {why}")
    if sb.shape != (r, 2 * f):
        raise ValueError(f"gate_up_activation: sb has shape {sb.shape}, expected {(r, 2 * f)} (the joint layout)")
    if stages < 2 or store_slots < 1:
        raise ValueError("gate_up_activation needs at least two stages and one store slot, "
                         f"got {stages=}, {store_slots=}")
    dtype = x.dtype
    m_tiles, n_tiles = t // TILE_M, f // TILE_N
    k_steps = d // BLOCK_K + 1  # the frozen kernels' K steps, then the adapters' one
    programs = ws.program_count("gate_up_activation", programs, m_tiles * n_tiles, cluster, interpret)
    cluster_tiles = (m_tiles // cluster) * n_tiles  # what the loop walks: `cluster` tiles stacked along the rows
    multicast = ws.multicast(cluster)
    tf = smem_transforms(dtype, BLOCK_K)  # every SMEM tile here has 64 minor elements

    def jaxtune_gate_up_activation(x_gmem, xa_gmem, wg_gmem, wu_gmem, sb_gmem, gu_gmem, h_gmem):
        def scope(x_smem, wg_smem, wu_smem, out_smem, filled, consumed):
            wg = lax.axis_index("wg")  # 0, 1: consumers; 2: the producer

            def tile_at(linear):
                """(token rows, kernel columns, g's columns in gu, u's columns in gu, h's columns) of
                tile `linear`: bands of `TILE_BAND` token tiles walked snake-wise across the
                columns, so the tiles in flight share x's rows and the kernels' columns in L2."""
                mi, ni = plgpu.planar_snake(linear, (m_tiles // cluster, n_tiles), 0, TILE_BAND // cluster)
                if cluster > 1:
                    mi = mi * cluster + lax.axis_index("cluster")
                per_chunk = chunk // TILE_N
                g_col = (ni // per_chunk) * 2 * chunk + (ni % per_chunk) * TILE_N
                cols = pl.ds(ni * TILE_N, TILE_N)
                return (pl.ds(mi * TILE_M, TILE_M), cols, pl.ds(g_col, TILE_N), pl.ds(g_col + chunk, TILE_N), cols)

            def copies(loop):
                rows, cols, g_cols, u_cols, _ = tile_at(loop.index[0])

                def frozen(k, slot, barrier):
                    ks = pl.ds(k * BLOCK_K, BLOCK_K)
                    plgpu.copy_gmem_to_smem(x_gmem.at[rows, ks], x_smem.at[slot], barrier)
                    plgpu.copy_gmem_to_smem(wg_gmem.at[ks, cols], wg_smem.at[slot], barrier, **multicast)
                    plgpu.copy_gmem_to_smem(wu_gmem.at[ks, cols], wu_smem.at[slot], barrier, **multicast)

                def adapter(slot, barrier):
                    plgpu.copy_gmem_to_smem(xa_gmem.at[rows, :], x_smem.at[slot], barrier)
                    plgpu.copy_gmem_to_smem(sb_gmem.at[:, g_cols], wg_smem.at[slot], barrier, **multicast)
                    plgpu.copy_gmem_to_smem(sb_gmem.at[:, u_cols], wu_smem.at[slot], barrier, **multicast)

                return lax.rem(loop.local_index, CONSUMERS), frozen, adapter

            pl.when(wg == CONSUMERS)(lambda: ws.produce(cluster_tiles, programs // cluster, k_steps, stages, filled,
                                                        consumed, copies))

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(ws.consumer_registers(), action="increase")

                @plgpu.nd_loop((cluster_tiles,), collective_axes="program")
                def _tile(loop):
                    @pl.when(lax.rem(loop.local_index, CONSUMERS) == wg)
                    def _mine():
                        rows, _, g_cols, u_cols, h_cols = tile_at(loop.index[0])
                        first = loop.local_index * k_steps

                        def accumulate(acc_g, acc_u):
                            def mma(slot):
                                plgpu.wgmma(acc_g, x_smem.at[slot], wg_smem.at[slot])
                                plgpu.wgmma(acc_u, x_smem.at[slot], wu_smem.at[slot])
                                return 2

                            ws.consume(first, k_steps, stages, lambda slot: filled.at[wg * stages + slot], consumed,
                                       mma)
                            return acc_g[...].astype(dtype), acc_u[...].astype(dtype)

                        g, u = pl.run_scoped(accumulate, plgpu.ACC((TILE_M, TILE_N), jnp.float32),
                                             plgpu.ACC((TILE_M, TILE_N), jnp.float32))
                        h = (activation(g.astype(jnp.float32), hidden_act) * u.astype(jnp.float32)).astype(dtype)
                        # Six 64 × 64 stores through this consumer's slots, each refilled once its
                        # last store has been read out. (Its previous tile's stores were issued a
                        # whole main loop of the other consumer ago.)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        stores = [(value[:, i * STORE_N:(i + 1) * STORE_N], dst.at[:, pl.ds(i * STORE_N, STORE_N)])
                                  for value, dst in ((g, gu_gmem.at[rows, g_cols]), (u, gu_gmem.at[rows, u_cols]),
                                                     (h, h_gmem.at[rows, h_cols]))
                                  for i in range(TILE_N // STORE_N)]
                        for n, (value, dst) in enumerate(stores):
                            slot = out_smem.at[wg, n % store_slots]
                            if n >= store_slots:
                                plgpu.wait_smem_to_gmem(store_slots - 1, wait_read_only=True)
                            slot[...] = value
                            plgpu.commit_smem()  # the registers' writes land before TMA reads SMEM
                            plgpu.copy_smem_to_gmem(slot, dst)

                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scope,
            plgpu.SMEM((stages, TILE_M, BLOCK_K), dtype, transforms=tf),  # x (or xa) tiles
            plgpu.SMEM((stages, BLOCK_K, TILE_N), dtype, transforms=tf),  # Wg (or sB's gate) tiles
            plgpu.SMEM((stages, BLOCK_K, TILE_N), dtype, transforms=tf),  # Wu (or sB's up) tiles
            plgpu.SMEM((CONSUMERS, store_slots, TILE_M, STORE_N), dtype, transforms=tf),  # each consumer's store slots
            plgpu.Barrier(num_arrivals=3, num_barriers=CONSUMERS * stages),  # slot filled, per consumer
            # slot consumed (with a cluster: by both programs' consumers, as both programs' copies refill it)
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=stages) if cluster > 1
            else plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            collective_axes="wg",
        )

    out_type = (jax.ShapeDtypeStruct((t, 2 * f), dtype), jax.ShapeDtypeStruct((t, f), dtype))
    kernel = ws.kernel(jaxtune_gate_up_activation, out_type, programs, cluster, interpret)
    return kernel(x, xa, w_gate, w_up, sb)

