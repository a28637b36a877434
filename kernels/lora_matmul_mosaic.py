"""A LoRA projection's two products and an optional residual as one Mosaic GPU (Hopper) kernel:
`out = residual + x@W + xa@sB`, in x's dtype, with float32 accumulation.

Why (issue 9, benchmarks/RESULTS.md, eighteenth round): around a LoRA projection XLA runs cuBLAS for
`x@W`, a Triton GEMM fusion for the adapter's `xa@sB` and a pass that adds the two (and, at o_proj
and down_proj, the residual stream): cuBLAS takes a matrix addend only as an operand as it is, never
another fusion's output, so those passes cannot be written away. Here the adapter's product is one
more K step into the same float32 accumulator, and the residual is read in the epilogue while the
other consumer's wgmma's run.

The same kernel serves the backward's input gradient: with `transpose=True` it computes
`x@Wᵀ + xa@sBᵀ` from W `[N, K]` and sB `[N, r]` as stored (for a projection `y = x@W + (x@A)@sB'`
that is `dx = dy@Wᵀ + dxa@Aᵀ` with `dxa = dy@sB'ᵀ`: W and A exactly as the parameters hold them).

Two schedules, one producer warpgroup streaming every K step of every tile through one ring of SMEM
slots to two consumer warpgroups (kernels/mosaic_warp_specialized.py):
- ping-pong (`kernels/gate_up_activation_mosaic.py`'s, its docstring says why): each consumer owns
  whole 64 × 256 tiles and they take the program's tiles in turn, so one's epilogue runs under the
  other's main loop; 4 stages;
- cooperative: both consumers on every 128 × 256 tile, 64 rows each, sharing its W tile: half the
  SMEM (and L2) traffic per product, which is what held ping-pong's main loop 8–14% behind cuBLAS
  at long K; 3 stages fit. Measured on an H200 at the 1B step's shapes (RESULTS, twentieth round):
  down_proj's forward (K 8192) 373 µs against ping-pong's 398, XLA's form 394, cuBLAS's GEMM alone
  345–353; q/k/v and o_proj's backward 2–7 µs faster than ping-pong, o_proj's forward 2 µs slower.
Each consumer has a `[64, 256]` staging buffer (four 64 × 64 swizzled tiles); with a residual it
loads the tile's residual there when its main loop starts, adds it in float32 in the epilogue, and
stores the sum from the same buffer.

The adapters' K is padded to 64 (`ADAPTER_K`, see gate_up_activation_mosaic's docstring: wgmma's A
operand lowers here only with 128-byte swizzled rows); the zero rows or columns add nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxtune.kernels import mosaic_warp_specialized as ws
from jaxtune.kernels.mosaic_smem import smem_transforms

TILE_M = 64  # token rows per tile (one consumer's wgmma rows)
TILE_N = 256  # output columns per tile: one 64 × 256 float32 accumulator, 128 registers a thread
BLOCK_K = 64  # one 128-byte swizzle row of bf16
ADAPTER_K = 64  # the adapters' K, padded
STORE_N = 64  # columns per output store (the staging buffer is TILE_N // STORE_N such tiles)
# Token rows per band of the tile order: 2048 measured best for both tilings at the 1B step's
# shapes (32 ping-pong tiles, as gate_up_activation_mosaic's; 16 cooperative ones), RESULTS.
BAND_ROWS = 2048
CONSUMERS = ws.CONSUMERS


def supports(tokens: int, k: int, n: int, adapter_k: int, dtype, cluster: int = 1,
             cooperative: bool = False) -> str | None:
    """None where the kernel takes `[tokens, k] @ [k, n]` with adapters of K `adapter_k` (padded) in
    `dtype` over CTA clusters of `cluster` (`cooperative`: see `lora_matmul`), else why not (one
    line)."""
    if cooperative and cluster != 1:
        return f"cluster = {cluster} with cooperative tiles (1 only)"
    if adapter_k != ADAPTER_K:
        return f"adapter K = {adapter_k}: the kernel takes one K step of {ADAPTER_K} (ranks up to {ADAPTER_K})"
    tile_m = TILE_M * (CONSUMERS if cooperative else 1)
    multiples = (("tokens", tokens, tile_m), ("K", k, BLOCK_K), ("N", n, TILE_N))
    return ws.shape_problem(dtype, multiples, tokens // TILE_M, cluster)


@functools.partial(jax.jit, static_argnames=("transpose", "stages", "cluster", "cooperative", "programs",
                                             "interpret"))
def lora_matmul(x, w, xa, sb, residual=None, *, transpose: bool = False, stages: int = 4, cluster: int = 1,
                cooperative: bool = False, programs: int | None = None, interpret: bool = False):
    """`residual + x@W + xa@sB` (`transpose`: `x@Wᵀ + xa@sBᵀ`, plus the residual) for x `[T, K]`,
    W `[K, N]` (`[N, K]`), xa `[T, ADAPTER_K]`, sB `[ADAPTER_K, N]` (`[N, ADAPTER_K]`), residual
    `[T, N]` or None; one dtype throughout, float32 accumulation, the residual added in float32
    before the one rounding. `programs`: persistent programs sharing the tiles (default one per SM;
    3 in interpret mode, so the CPU tests walk several tiles per program and both consumers).
    `cluster` 2: programs in pairs on vertically adjacent tiles, W's and sB's tiles multicast to both.
    `cooperative`: both consumers work on every tile, 128 rows × 256 columns, 64 rows each, sharing
    its W tile (half the SMEM traffic per product of ping-pong's tiles, for long K where the
    epilogue's share is small; 3 stages fit: pass stages=3)."""
    t, k = x.shape
    n = w.shape[0] if transpose else w.shape[1]
    r = xa.shape[1]
    why = supports(t, k, n, r, x.dtype, cluster, cooperative)
    if why is not None:
        raise ValueError(f"lora_matmul does not take these shapes: {why}")
    want = {"w": (n, k) if transpose else (k, n), "sb": (n, r) if transpose else (r, n), "xa": (t, r)}
    got = {"w": w.shape, "sb": sb.shape, "xa": xa.shape}
    if residual is not None:
        want["residual"], got["residual"] = (t, n), residual.shape
    for name in want:
        if tuple(got[name]) != want[name]:
            raise ValueError(f"lora_matmul: {name} has shape {tuple(got[name])}, expected {want[name]} "
                             f"(x {tuple(x.shape)}, transpose={transpose})")
    if stages < 2:
        raise ValueError(f"lora_matmul needs at least two stages, got {stages=}")
    dtype = x.dtype
    tile_m = TILE_M * (CONSUMERS if cooperative else 1)  # rows per tile
    m_tiles, n_tiles = t // tile_m, n // TILE_N
    k_steps = k // BLOCK_K + 1  # the frozen kernel's K steps, then the adapters' one
    programs = ws.program_count("lora_matmul", programs, m_tiles * n_tiles, cluster, interpret)
    cluster_tiles = (m_tiles // cluster) * n_tiles
    multicast = ws.multicast(cluster)
    tf = smem_transforms(dtype, BLOCK_K)  # every SMEM tile here has 64 minor elements
    chunks = TILE_N // STORE_N
    with_residual = residual is not None
    w_tile = (TILE_N, BLOCK_K) if transpose else (BLOCK_K, TILE_N)

    def jaxtune_lora_matmul(x_gmem, w_gmem, xa_gmem, sb_gmem, *refs):
        res_gmem, out_gmem = refs if with_residual else (None, refs[0])

        def scope(x_smem, w_smem, out_smem, filled, consumed, res_ready):
            wg = lax.axis_index("wg")  # 0, 1: consumers; 2: the producer

            def tile_at(linear):
                """(token rows, output columns) of tile `linear`: bands of `BAND_ROWS` token rows
                walked snake-wise across the columns, so tiles in flight share x's rows and W's
                columns in L2."""
                band = max(BAND_ROWS // (tile_m * cluster), 1)
                mi, ni = plgpu.planar_snake(linear, (m_tiles // cluster, n_tiles), 0, band)
                if cluster > 1:
                    mi = mi * cluster + lax.axis_index("cluster")
                return pl.ds(mi * tile_m, tile_m), pl.ds(ni * TILE_N, TILE_N)

            def copies(loop):
                rows, cols = tile_at(loop.index[0])

                def frozen(k, slot, barrier):
                    ks = pl.ds(k * BLOCK_K, BLOCK_K)
                    plgpu.copy_gmem_to_smem(x_gmem.at[rows, ks], x_smem.at[slot], barrier)
                    src = w_gmem.at[cols, ks] if transpose else w_gmem.at[ks, cols]
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot], barrier, **multicast)

                def adapter(slot, barrier):
                    plgpu.copy_gmem_to_smem(xa_gmem.at[rows, :], x_smem.at[slot], barrier)
                    src = sb_gmem.at[cols, :] if transpose else sb_gmem.at[:, cols]
                    plgpu.copy_gmem_to_smem(src, w_smem.at[slot], barrier, **multicast)

                return 0 if cooperative else lax.rem(loop.local_index, CONSUMERS), frozen, adapter

            pl.when(wg == CONSUMERS)(lambda: ws.produce(cluster_tiles, programs // cluster, k_steps, stages, filled,
                                                        consumed, copies))

            @pl.when(wg < CONSUMERS)
            def _consumer():
                plgpu.set_max_registers(ws.consumer_registers(), action="increase")
                staging = out_smem.at[wg]

                @plgpu.nd_loop((cluster_tiles,), collective_axes="program")
                def _tile(loop):
                    def tile():
                        tile_rows, cols = tile_at(loop.index[0])
                        # this consumer's rows of the tile
                        rows = pl.ds(tile_rows.start + wg * TILE_M, TILE_M) if cooperative else tile_rows

                        # The previous tile's stores have read the staging buffer (ping-pong: they
                        # were issued a whole main loop of the other consumer ago).
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        if with_residual:  # lands during the main loop
                            for i in range(chunks):
                                plgpu.copy_gmem_to_smem(res_gmem.at[rows, pl.ds(cols.start + i * STORE_N, STORE_N)],
                                                        staging.at[i], res_ready.at[wg])
                        first = loop.local_index * k_steps

                        def accumulate(acc):
                            def mma(slot):
                                x_view, w_view = x_smem.at[slot], w_smem.at[slot]
                                if cooperative:  # this consumer's 64 rows of the 128
                                    x_view = x_view.at[pl.ds(wg * TILE_M, TILE_M)]
                                plgpu.wgmma(acc, x_view, w_view.transpose((1, 0)) if transpose else w_view)
                                return 1

                            owner = 0 if cooperative else wg
                            ws.consume(first, k_steps, stages, lambda slot: filled.at[owner * stages + slot], consumed,
                                       mma)
                            return acc[...]

                        acc = pl.run_scoped(accumulate, plgpu.ACC((TILE_M, TILE_N), jnp.float32))
                        if with_residual:
                            plgpu.barrier_wait(res_ready.at[wg])
                        for i in range(chunks):
                            value = acc[:, i * STORE_N:(i + 1) * STORE_N]
                            if with_residual:
                                value = value + staging.at[i][...].astype(jnp.float32)
                            staging.at[i][...] = value.astype(dtype)
                            plgpu.commit_smem()  # the registers' writes land before TMA reads SMEM
                            plgpu.copy_smem_to_gmem(staging.at[i],
                                                    out_gmem.at[rows, pl.ds(cols.start + i * STORE_N, STORE_N)])

                    if cooperative:  # every tile, both consumers
                        tile()
                    else:  # the program's tiles in turn
                        pl.when(lax.rem(loop.local_index, CONSUMERS) == wg)(tile)

                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scope,
            plgpu.SMEM((stages, tile_m, BLOCK_K), dtype, transforms=tf),  # x (or xa) tiles
            plgpu.SMEM((stages, *w_tile), dtype, transforms=tf),  # W (or sB) tiles
            plgpu.SMEM((CONSUMERS, chunks, TILE_M, STORE_N), dtype, transforms=tf),  # each consumer's staging
            # slot filled: per consumer (ping-pong), or one both wait on (cooperative)
            plgpu.Barrier(num_arrivals=2, num_barriers=(1 if cooperative else CONSUMERS) * stages),
            # slot consumed (with a cluster: by both programs' consumers, as both programs' copies
            # refill it; cooperative: by both consumers)
            plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=stages) if cluster > 1
            else plgpu.Barrier(num_arrivals=CONSUMERS if cooperative else 1, num_barriers=stages),
            plgpu.Barrier(num_arrivals=chunks, num_barriers=CONSUMERS),  # a consumer's residual tile landed
            collective_axes="wg",
        )

    kernel = ws.kernel(jaxtune_lora_matmul, jax.ShapeDtypeStruct((t, n), dtype), programs, cluster, interpret)
    return kernel(x, w, xa, sb, *(() if residual is None else (residual,)))

