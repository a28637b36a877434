"""A gated MLP's LoRA gate/up projections and its activation as one Mosaic GPU (Hopper) kernel:
`g = x@Wg + xa@sBg`, `u = x@Wu + xa@sBu`, `h = act(g)·u`, all three written in x's dtype.

Why (issue 9, benchmarks/RESULTS.md, thirteenth and fourteenth rounds): on the 1B LoRA step the
board runs at its power limit, so a step's time follows its energy, and the passes between the
matmuls are the part of that energy that can go without changing the arithmetic. Around the
gate/up matmuls XLA makes four: `[x | xa]` copied once per projection (0.65 ms per step), `[W ;
sB]` formed once per projection (0.69 ms), and the activation reading g and u back to write h
(1.66 ms). Here the frozen kernels and the adapters stay separate operands (the adapters' product
is one more K step of 64 into the same float32 accumulators) and h is formed from the tiles of g
and u while they are in registers, so of those ≈ 3 ms only the writes of g, u and h remain.

The adapters' operands come padded to a K of 64 (`ADAPTER_K`): wgmma's A operand lowers here only
with 128-byte swizzled rows (jax 0.11.2: ranks 16 and 32 fail Mosaic GPU's layout inference), so
the caller passes both adapters' inputs side by side, `xa = x@[A_gate | A_up | 0]`, and each sB
zero-padded to the rows of its own adapter (`[sB_gate; 0]`, `[0; sB_up; 0]`). Up to a rank of 32
per adapter that is one K step, 1/32 of the main loop's at the 1B shape.

Measured on an H200 (RESULTS, fifteenth round): at the step's shapes it takes 989 µs against 1,039
for cuBLAS plus XLA's concatenations and pass (1.21–1.27 against 1.29 J/TFLOP), but inside the
training step cuBLAS's gate/up GEMMs run at 364 µs each and the kernel at 882 µs, so the step is
level (+0.1%). The trainer runs it only with `jaxtune/lora_gate_up.py`'s `KERNEL` set (off by
default). What would make it pay: the two consumers finish a tile together and store together, so
the tensor cores idle through every epilogue; a ping-pong schedule (each consumer its own tile,
one's stores under the other's wgmma's, as cuBLAS's persistent kernels do) is the next step.

Layout: an output tile is 128 token rows × 128 columns of both g and u (128 × 256, like cuBLAS's
largest on this step). One persistent program per SM walks its share of the tiles (as jax's own
Hopper matmul does): the first version, one program per tile, spent 10% longer than cuBLAS plus
XLA's pass on the same work (1,151 µs at 3 stages), its epilogue and pipeline fill serialised with
the loads. Three warpgroups: a producer streams x `[128, 64]`, Wg and Wu `[64, 128]`
tiles through SMEM with TMA (`stages` buffers; it runs on into the next tile's loads while the
consumers store), and two consumers own 64 rows each, with two float32 accumulators (g's and u's)
of 64 × 128. The adapter operands (each consumer's rows of xa; the sB tiles, loaded once for both)
are fetched by TMA at a tile's start and used after its main loop; the outputs leave in 64 × 64
stores through two slots per consumer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxtune.kernels.activation_math import ACTIVATIONS, activation
from jaxtune.kernels.mosaic_smem import interpret_params, smem_transforms

BLOCK_M = 64  # rows per consumer warpgroup (one wgmma M)
TILE_M = 2 * BLOCK_M  # rows per program
BLOCK_N = 128  # columns of g (and of u) per program
BLOCK_K = 64  # one 128-byte swizzle row of bf16
ADAPTER_K = 64  # the adapters' K, padded (see the module docstring)
STORE_N = 64  # columns per output store (a 64 × 64 tile through one of two SMEM slots)
TILE_BAND = 16  # token tiles per band of the tile order (see tile_loop)


def supports(tokens: int, hidden: int, mlp: int, adapter_k: int, dtype, hidden_act: str) -> str | None:
    """None where the kernel takes these shapes (`adapter_k`: xa's width, both adapters' ranks
    with padding), else why not (one line)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (bf16 or fp16 only)"
    if hidden_act not in ACTIVATIONS:
        return f"activation {hidden_act!r} (one of {ACTIVATIONS})"
    for name, size, step in (("tokens", tokens, TILE_M), ("hidden", hidden, BLOCK_K), ("mlp", mlp, BLOCK_N)):
        if size % step:
            return f"{name} = {size} is not a multiple of {step}"
    if adapter_k != ADAPTER_K:
        return f"adapter K = {adapter_k}: the kernel takes one K step of {ADAPTER_K} (ranks up to {ADAPTER_K // 2} each)"
    return None


@functools.partial(jax.jit, static_argnames=("hidden_act", "stages", "programs", "interpret"))
def gate_up_activation(x, xa, w_gate, w_up, sb_gate, sb_up, *, hidden_act: str, stages: int = 3,
                       programs: int | None = None, interpret: bool = False):
    """(g, u, h) `[T, F]` for x `[T, D]`, xa `[T, K]` (both adapters' x@A, dropout applied, padded:
    see the module docstring), w_gate/w_up `[D, F]` (frozen), sb_gate/sb_up `[K, F]` (s·B, each
    zero outside its adapter's rows); one dtype throughout, float32 accumulation, h = act(g)·u
    computed in float32 from the rounded g and u (as the unfused model does). `programs`: how many
    persistent programs share the output tiles (default: one per SM; 3 in interpret mode, so the
    CPU tests walk several tiles per program)."""
    t, d = x.shape
    f = w_gate.shape[1]
    r = xa.shape[1]
    why = supports(t, d, f, r, x.dtype, hidden_act)
    if why is not None:
        raise ValueError(f"gate_up_activation does not take these shapes: {why}")
    dtype = x.dtype
    m_tiles, n_tiles = t // TILE_M, f // BLOCK_N
    if programs is None:
        programs = 3 if interpret else _sm_count()
    if programs < 1:
        raise ValueError(f"gate_up_activation needs at least one program, got programs={programs}")
    programs = min(programs, m_tiles * n_tiles)
    tf_k = smem_transforms(dtype, BLOCK_K)  # x and xa tiles: K minor
    tf_n = smem_transforms(dtype, BLOCK_N)  # kernel and sB tiles: N minor
    tf_out = smem_transforms(dtype, STORE_N)

    def k_step(indices, x_smem, wg_smem, wu_smem, carry):
        acc_g, acc_u = carry
        rows = x_smem.at[pl.ds(lax.axis_index("wg") * BLOCK_M, BLOCK_M)]
        plgpu.wgmma(acc_g, rows, wg_smem)
        plgpu.wgmma(acc_u, rows, wu_smem)
        # Both read this stage's buffers: done before they are refilled. (Releasing the buffers a
        # step later and waiting only for the previous step's wgmma's measured level: RESULTS.)
        plgpu.wgmma_wait(0)
        return carry

    def pipeline_for(compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            k_step, grid=(d // BLOCK_K,), memory_registers=40, max_concurrent_steps=stages,
            num_compute_wgs=2, wg_axis="wg", compute_context=compute_context,
            in_specs=[plgpu.BlockSpec((TILE_M, BLOCK_K), lambda k: (0, k), transforms=tf_k),
                      plgpu.BlockSpec((BLOCK_K, BLOCK_N), lambda k: (k, 0), transforms=tf_n),
                      plgpu.BlockSpec((BLOCK_K, BLOCK_N), lambda k: (k, 0), transforms=tf_n)])

    def jaxtune_gate_up_activation(x_gmem, xa_gmem, wg_gmem, wu_gmem, sbg_gmem, sbu_gmem, g_gmem, u_gmem, h_gmem):
        # The pipeline's buffers and barriers live across the tile loop (its barriers' phases
        # carry from one tile to the next), so they are allocated once, outside it.
        ignore = lambda *_, **__: None
        allocations = pipeline_for(ignore).get_allocations(x_gmem, wg_gmem, wu_gmem)

        def scope(pipeline_allocations, xa_smem, sb_smem, out_smem, lora_loaded, sb_free):
            wg = lax.axis_index("wg")  # 0, 1: consumers; 2: the pipeline's producer

            @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="program")
            def tile_loop(loop):
                (linear,) = loop.index
                # Bands of 16 token tiles, walked snake-wise across the columns: the 132 tiles in
                # flight read ≈ 8 MB of x and ≈ 8 MB of the kernels, which stay in L2.
                mi, ni = plgpu.planar_snake(linear, (m_tiles, n_tiles), 0, TILE_BAND)
                cols = pl.ds(ni * BLOCK_N, BLOCK_N)
                my_rows = pl.ds(mi * TILE_M + wg * BLOCK_M, BLOCK_M)

                def consumer(pipeline):
                    # The adapters' operands, waited on after the main loop has hidden them. Each
                    # consumer fetches its rows of xa; consumer 0 the sB tiles both read, once
                    # consumer 1 has finished reading the previous tile's.
                    plgpu.copy_gmem_to_smem(xa_gmem.at[my_rows, :], xa_smem.at[wg], lora_loaded.at[wg])

                    @pl.when(wg == 0)
                    def _():
                        @pl.when(loop.local_index > 0)
                        def _():
                            plgpu.barrier_wait(sb_free)

                        plgpu.copy_gmem_to_smem(sbg_gmem.at[:, cols], sb_smem.at[0], lora_loaded.at[2])
                        plgpu.copy_gmem_to_smem(sbu_gmem.at[:, cols], sb_smem.at[1], lora_loaded.at[3])

                    def accumulate(acc_g, acc_u):
                        pipeline((acc_g, acc_u))
                        for barrier in (lora_loaded.at[wg], lora_loaded.at[2], lora_loaded.at[3]):
                            plgpu.barrier_wait(barrier)
                        plgpu.wgmma(acc_g, xa_smem.at[wg], sb_smem.at[0])
                        plgpu.wgmma(acc_u, xa_smem.at[wg], sb_smem.at[1])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(sb_free)
                        return acc_g[...].astype(dtype), acc_u[...].astype(dtype)

                    g, u = pl.run_scoped(accumulate, plgpu.ACC((BLOCK_M, BLOCK_N), jnp.float32),
                                         plgpu.ACC((BLOCK_M, BLOCK_N), jnp.float32))
                    h = (activation(g.astype(jnp.float32), hidden_act) * u.astype(jnp.float32)).astype(dtype)
                    # Six 64 × 64 stores through two slots: each slot is refilled once its
                    # previous store has been read out, so the stores overlap the writes, the
                    # next ones and (in the producer) the next tile's loads.
                    store = 0
                    for value, dst in ((g, g_gmem), (u, u_gmem), (h, h_gmem)):
                        for half in range(BLOCK_N // STORE_N):
                            slot = out_smem.at[wg, store % 2]
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            slot[...] = value[:, half * STORE_N:(half + 1) * STORE_N]
                            plgpu.commit_smem()  # the registers' writes land before TMA reads SMEM
                            plgpu.copy_smem_to_gmem(slot, dst.at[my_rows, pl.ds(ni * BLOCK_N + half * STORE_N, STORE_N)])
                            store += 1

                pipeline_for(consumer)(x_gmem.at[pl.ds(mi * TILE_M, TILE_M), :], wg_gmem.at[:, cols],
                                       wu_gmem.at[:, cols], allocations=pipeline_allocations)

            @pl.when(wg == 0)  # every program has at least one tile
            def _():
                plgpu.barrier_wait(sb_free)  # the last tile's release, so no phase is left unobserved

            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scope,
            allocations,
            plgpu.SMEM((2, BLOCK_M, r), dtype, transforms=tf_k),  # each consumer's rows of xa
            plgpu.SMEM((2, r, BLOCK_N), dtype, transforms=tf_n),  # the sB_gate and sB_up tiles
            plgpu.SMEM((2, 2, BLOCK_M, STORE_N), dtype, transforms=tf_out),  # each consumer's 2 store slots
            plgpu.Barrier(num_barriers=4),  # xa per consumer, then sB_gate and sB_up
            plgpu.Barrier(num_arrivals=2),  # both consumers done reading the sB tiles
            collective_axes="wg",
        )

    out = jax.ShapeDtypeStruct((t, f), dtype)
    kernel = plgpu.kernel(
        jaxtune_gate_up_activation,  # named after what it is, for compiler dumps and profiles
        out_type=(out, out, out),
        grid=(programs,),
        grid_names=("program",),
        num_threads=3,
        thread_name="wg",
        compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )
    return kernel(x, xa, w_gate, w_up, sb_gate, sb_up)


def _sm_count() -> int:
    """SMs of the device the kernel is traced for (an abstract one when lowered ahead of time)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.num_cores if device is not None else jax.devices()[0].core_count
