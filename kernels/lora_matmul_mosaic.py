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

`lora_matmul_activation_grad` is the transposed product with another epilogue: a gated MLP's
down_proj backward `dh = dy@Wdᵀ + dha@Adᵀ` followed by the activation's backward, `dg = dh·u·act'(g)`,
`du = dh·act(g)`, g and u read from (dg and du written to) the joint gate/up layout through the
staging buffer, two g/u chunk pairs at a time. Where cuBLAS wrote dh `[T, F]` and the activation's
backward kernel read it back (kernels/lora_activation_grad.py), dh stays in the accumulator: at the
1B step's shapes on an H200 467 µs against 523–538, +1.0–1.1% on the step (RESULTS, twenty-first
round), with ping-pong tiles (cooperative ones: 489 µs, the epilogue no longer hidden).

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
from jaxtune.kernels.activation_math import ACTIVATIONS, activation_and_grad
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
    n = w.shape[0] if transpose else w.shape[1]
    extra = {} if residual is None else {"residual": (residual, (x.shape[0], n))}
    return _call(x, w, xa, sb, extra, None, transpose=transpose, stages=stages, cluster=cluster,
                 cooperative=cooperative, programs=programs, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("hidden_act", "chunk", "stages", "cooperative", "programs", "interpret"))
def lora_matmul_activation_grad(x, w, xa, sb, gate_up, *, hidden_act: str, chunk: int, stages: int = 4,
                                cooperative: bool = False, programs: int | None = None, interpret: bool = False):
    """A gated MLP's gate/up gradient through its LoRA down_proj's backward, in one pass:
    `dh = x@Wᵀ + xa@sBᵀ` (x = dy `[T, D]`, W = W_down `[F, D]`, xa = dy@sB_downᵀ `[T, ADAPTER_K]`,
    sB = A_down `[F, ADAPTER_K]`, both zero-padded), then for `h = act(g)·u`: `dg = dh·u·act'(g)`,
    `du = dh·act(g)`, with g and u read from `gate_up` `[T, 2F]` in the joint layout (chunk j's
    `chunk` gate columns, then its `chunk` up columns; `lora_gated_down.JOINT` flattened) and the
    result written in that layout. dh stays in the float32 accumulator (never rounded, never
    written); the activation's arithmetic is float32 from the rounded g and u, one rounding at the
    end. See `lora_matmul` for the tiling arguments; the defaults (ping-pong, 4 stages) measured
    fastest (see the module docstring)."""
    f = w.shape[0]
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"lora_matmul_activation_grad: activation {hidden_act!r} (one of {ACTIVATIONS})")
    if chunk % STORE_N or f % chunk:
        raise ValueError(f"lora_matmul_activation_grad: chunk = {chunk} must be a multiple of {STORE_N} "
                         f"dividing F = {f}")
    extra = {"gate_up": (gate_up, (x.shape[0], 2 * f))}
    return _call(x, w, xa, sb, extra, (hidden_act, chunk), transpose=True, stages=stages, cluster=1,
                 cooperative=cooperative, programs=programs, interpret=interpret)


def _call(x, w, xa, sb, extra, gated, *, transpose, stages, cluster, cooperative, programs, interpret):
    """The kernel: `extra` holds the epilogue's input by name (`residual` or `gate_up`) with its
    expected shape; `gated` is None (the product, plus the residual if given) or `(hidden_act,
    chunk)` (`lora_matmul_activation_grad`'s epilogue)."""
    name = "lora_matmul_activation_grad" if gated else "lora_matmul"
    t, k = x.shape
    n = w.shape[0] if transpose else w.shape[1]
    r = xa.shape[1]
    why = supports(t, k, n, r, x.dtype, cluster, cooperative)
    if why is not None:
        raise ValueError(f"{name} does not take these shapes: {why}")
    want = {"w": (n, k) if transpose else (k, n), "sb": (n, r) if transpose else (r, n), "xa": (t, r)}
    got = {"w": w.shape, "sb": sb.shape, "xa": xa.shape}
    for key, (array, shape) in extra.items():
        want[key], got[key] = shape, array.shape
    for key in want:
        if tuple(got[key]) != want[key]:
            raise ValueError(f"{name}: {key} has shape {tuple(got[key])}, expected {want[key]} "
                             f"(x {tuple(x.shape)}, transpose={transpose})")
    if stages < 2:
        raise ValueError(f"{name} needs at least two stages, got {stages=}")
    dtype = x.dtype
    tile_m = TILE_M * (CONSUMERS if cooperative else 1)  # rows per tile
    m_tiles, n_tiles = t // tile_m, n // TILE_N
    k_steps = k // BLOCK_K + 1  # the frozen kernel's K steps, then the adapters' one
    programs = ws.program_count(name, programs, m_tiles * n_tiles, cluster, interpret)
    cluster_tiles = (m_tiles // cluster) * n_tiles
    multicast = ws.multicast(cluster)
    tf = smem_transforms(dtype, BLOCK_K)  # every SMEM tile here has 64 minor elements
    chunks = TILE_N // STORE_N
    w_tile = (TILE_N, BLOCK_K) if transpose else (BLOCK_K, TILE_N)

    def jaxtune_lora_matmul(x_gmem, w_gmem, xa_gmem, sb_gmem, *refs):
        epilogue_gmem, out_gmem = refs if extra else (None, refs[0])

        def scope(x_smem, w_smem, out_smem, filled, consumed, staged):
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
                epilogue = (_GatedGradEpilogue(gated, staging, staged, wg, epilogue_gmem, out_gmem, dtype) if gated
                            else _SumEpilogue(staging, staged.at[wg], epilogue_gmem, out_gmem, dtype))

                @plgpu.nd_loop((cluster_tiles,), collective_axes="program")
                def _tile(loop):
                    def tile():
                        tile_rows, cols = tile_at(loop.index[0])
                        # this consumer's rows of the tile
                        rows = pl.ds(tile_rows.start + wg * TILE_M, TILE_M) if cooperative else tile_rows

                        # The previous tile's stores have read the staging buffer (ping-pong: they
                        # were issued a whole main loop of the other consumer ago).
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        epilogue.prefetch(rows, cols)  # lands during the main loop
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

                        epilogue.finish(pl.run_scoped(accumulate, plgpu.ACC((TILE_M, TILE_N), jnp.float32)), rows,
                                        cols)

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
            # a consumer's staged epilogue input landed: the residual tile (all its chunks), or one
            # pair of g and u chunks per barrier (two pairs in flight)
            plgpu.Barrier(num_arrivals=2, num_barriers=CONSUMERS * _PAIRS) if gated
            else plgpu.Barrier(num_arrivals=chunks, num_barriers=CONSUMERS),
            collective_axes="wg",
        )

    if gated:  # named after what it computes, in profiles
        jaxtune_lora_matmul.__name__ = jaxtune_lora_matmul.__qualname__ = "jaxtune_lora_matmul_activation_grad"
    out_n = 2 * n if gated else n
    kernel = ws.kernel(jaxtune_lora_matmul, jax.ShapeDtypeStruct((t, out_n), dtype), programs, cluster, interpret)
    return kernel(x, w, xa, sb, *(array for array, _ in extra.values()))


_PAIRS = 2  # g/u chunk pairs a consumer's staging buffer holds (its four 64 × 64 tiles)


class _SumEpilogue:
    """The product, plus the residual if given (`res_gmem`): the residual's tile is loaded into the
    staging buffer during the main loop, added in float32, and the sum stored from the same buffer."""

    def __init__(self, staging, ready, res_gmem, out_gmem, dtype):
        self.staging, self.ready, self.res_gmem, self.out_gmem, self.dtype = staging, ready, res_gmem, out_gmem, dtype

    def _columns(self, cols, i):
        return pl.ds(cols.start + i * STORE_N, STORE_N)

    def prefetch(self, rows, cols):
        if self.res_gmem is not None:
            for i in range(TILE_N // STORE_N):
                plgpu.copy_gmem_to_smem(self.res_gmem.at[rows, self._columns(cols, i)], self.staging.at[i],
                                        self.ready)

    def finish(self, acc, rows, cols):
        if self.res_gmem is not None:
            plgpu.barrier_wait(self.ready)
        for i in range(TILE_N // STORE_N):
            value = acc[:, i * STORE_N:(i + 1) * STORE_N]
            if self.res_gmem is not None:
                value = value + self.staging.at[i][...].astype(jnp.float32)
            self.staging.at[i][...] = value.astype(self.dtype)
            plgpu.commit_smem()  # the registers' writes land before TMA reads SMEM
            plgpu.copy_smem_to_gmem(self.staging.at[i], self.out_gmem.at[rows, self._columns(cols, i)])


class _GatedGradEpilogue:
    """`lora_matmul_activation_grad`'s: for each 64-column chunk i of the accumulator (dh), g and u
    from the joint layout into a staging pair (slots 2p, 2p + 1, p = i % 2), dg and du computed
    over them in place and stored from there. Pairs 0 and 1 load during the main loop; chunk i + 2's
    pair is loaded into chunk i's slots once chunk i's stores have read them, while chunk i + 1 is
    computed."""

    def __init__(self, gated, staging, ready, wg, gu_gmem, out_gmem, dtype):
        self.hidden_act, self.chunk = gated
        self.staging, self.ready, self.wg = staging, ready, wg
        self.gu_gmem, self.out_gmem, self.dtype = gu_gmem, out_gmem, dtype

    def _joint_columns(self, cols, i):
        """(g's, u's) columns in the joint layout for the accumulator's chunk i."""
        col = cols.start + i * STORE_N
        g_col = lax.div(col, self.chunk) * (2 * self.chunk) + lax.rem(col, self.chunk)
        return pl.ds(g_col, STORE_N), pl.ds(g_col + self.chunk, STORE_N)

    def _load(self, rows, cols, i):
        pair = i % _PAIRS
        barrier = self.ready.at[self.wg * _PAIRS + pair]
        for slot, columns in zip((2 * pair, 2 * pair + 1), self._joint_columns(cols, i)):
            plgpu.copy_gmem_to_smem(self.gu_gmem.at[rows, columns], self.staging.at[slot], barrier)

    def prefetch(self, rows, cols):
        for i in range(_PAIRS):
            self._load(rows, cols, i)

    def finish(self, acc, rows, cols):
        chunks = TILE_N // STORE_N
        for i in range(chunks):
            pair = i % _PAIRS
            g_slot, u_slot = self.staging.at[2 * pair], self.staging.at[2 * pair + 1]
            plgpu.barrier_wait(self.ready.at[self.wg * _PAIRS + pair])
            dh = acc[:, i * STORE_N:(i + 1) * STORE_N]
            g, u = g_slot[...].astype(jnp.float32), u_slot[...].astype(jnp.float32)
            act, d_act = activation_and_grad(g, self.hidden_act)
            g_slot[...] = (dh * u * d_act).astype(self.dtype)
            u_slot[...] = (dh * act).astype(self.dtype)
            plgpu.commit_smem()  # the registers' writes land before TMA reads SMEM
            for slot, columns in zip((g_slot, u_slot), self._joint_columns(cols, i)):
                plgpu.copy_smem_to_gmem(slot, self.out_gmem.at[rows, columns])
            if i + _PAIRS < chunks:  # refill this pair once its stores have read it
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                self._load(rows, cols, i + _PAIRS)
