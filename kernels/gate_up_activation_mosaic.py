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

Whether it pays depends on it matching cuBLAS's energy per FLOP on the matmul itself (the gate/up
matmuls are 12 ms of the step): `benchmarks/kernel_energy.py` measures it against cuBLAS plus XLA's
activation pass at the step's shapes. The trainer runs it only with `jaxtune/lora_gate_up.py`'s
`KERNEL` set (off by default until the step's energy per token is measured with it).

Layout: a program owns 128 token rows and 128 columns of both g and u (a 128 × 256 output tile,
like cuBLAS's largest on this step). Three warpgroups: a producer streams x `[128, 64]`, Wg and
Wu `[64, 128]` tiles through SMEM with TMA (`stages` buffers), and two consumers own 64 rows each,
with two float32 accumulators (g's and u's) of 64 × 128. The adapter operands (each consumer's
rows of xa; the sB tiles, loaded once for both) are fetched by TMA at the start and used after the
main loop. Token tiles run fastest along the grid, so the programs in flight share a column block
of the kernels and x (32 MB at the 1B shape) stays in L2.
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


@functools.partial(jax.jit, static_argnames=("hidden_act", "stages", "interpret"))
def gate_up_activation(x, xa, w_gate, w_up, sb_gate, sb_up, *, hidden_act: str, stages: int = 2,
                       interpret: bool = False):
    """(g, u, h) `[T, F]` for x `[T, D]`, xa `[T, K]` (both adapters' x@A, dropout applied, padded:
    see the module docstring), w_gate/w_up `[D, F]` (frozen), sb_gate/sb_up `[K, F]` (s·B, each
    zero outside its adapter's rows); one dtype throughout, float32 accumulation, h = act(g)·u
    computed in float32 from the rounded g and u (as the unfused model does)."""
    t, d = x.shape
    f = w_gate.shape[1]
    r = xa.shape[1]
    why = supports(t, d, f, r, x.dtype, hidden_act)
    if why is not None:
        raise ValueError(f"gate_up_activation does not take these shapes: {why}")
    dtype = x.dtype
    tf_k = smem_transforms(dtype, BLOCK_K)  # x tiles: K minor
    tf_n = smem_transforms(dtype, BLOCK_N)  # kernel tiles and outputs: N minor

    def jaxtune_gate_up_activation(x_gmem, xa_gmem, wg_gmem, wu_gmem, sbg_gmem, sbu_gmem,
                                   g_gmem, u_gmem, h_gmem, xa_smem, sb_smem, out_smem, lora_barriers):
        mi, ni = lax.axis_index("m"), lax.axis_index("n")
        wg = lax.axis_index("wg")  # 0, 1: consumers; 2: the pipeline's producer
        cols = pl.ds(ni * BLOCK_N, BLOCK_N)
        my_rows = pl.ds(mi * TILE_M + wg * BLOCK_M, BLOCK_M)

        def k_step(indices, x_smem, wg_smem, wu_smem, carry):
            acc_g, acc_u = carry
            rows = x_smem.at[pl.ds(wg * BLOCK_M, BLOCK_M)]
            plgpu.wgmma(acc_g, rows, wg_smem)
            plgpu.wgmma(acc_u, rows, wu_smem)
            plgpu.wgmma_wait(0)  # both read this stage's buffers: done before they are refilled
            return carry

        def consumer(pipeline):
            # The adapters' operands: issued first, waited on after the main loop has hidden them.
            # Each consumer fetches its rows of xa; consumer 0 fetches the sB tiles both use.
            plgpu.copy_gmem_to_smem(xa_gmem.at[my_rows, :], xa_smem.at[wg], lora_barriers.at[wg])

            @pl.when(wg == 0)
            def _():
                plgpu.copy_gmem_to_smem(sbg_gmem.at[:, cols], sb_smem.at[0], lora_barriers.at[2])
                plgpu.copy_gmem_to_smem(sbu_gmem.at[:, cols], sb_smem.at[1], lora_barriers.at[3])

            def scope(acc_g, acc_u):
                pipeline((acc_g, acc_u))
                for barrier in (lora_barriers.at[wg], lora_barriers.at[2], lora_barriers.at[3]):
                    plgpu.barrier_wait(barrier)
                plgpu.wgmma(acc_g, xa_smem.at[wg], sb_smem.at[0])
                plgpu.wgmma(acc_u, xa_smem.at[wg], sb_smem.at[1])
                plgpu.wgmma_wait(0)
                g = acc_g[...].astype(dtype)
                u = acc_u[...].astype(dtype)
                h = (activation(g.astype(jnp.float32), hidden_act) * u.astype(jnp.float32)).astype(dtype)
                out = out_smem.at[wg]
                for value, dst in ((g, g_gmem), (u, u_gmem), (h, h_gmem)):
                    out[...] = value
                    plgpu.commit_smem()  # the registers' writes land before TMA reads SMEM
                    plgpu.copy_smem_to_gmem(out, dst.at[my_rows, cols])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # out is free again

            pl.run_scoped(scope, plgpu.ACC((BLOCK_M, BLOCK_N), jnp.float32),
                          plgpu.ACC((BLOCK_M, BLOCK_N), jnp.float32))
            plgpu.wait_smem_to_gmem(0)

        pipeline = plgpu.emit_pipeline_warp_specialized(
            k_step, grid=(d // BLOCK_K,), memory_registers=40, max_concurrent_steps=stages,
            num_compute_wgs=2, wg_axis="wg", compute_context=consumer,
            in_specs=[plgpu.BlockSpec((TILE_M, BLOCK_K), lambda k: (0, k), transforms=tf_k),
                      plgpu.BlockSpec((BLOCK_K, BLOCK_N), lambda k: (k, 0), transforms=tf_n),
                      plgpu.BlockSpec((BLOCK_K, BLOCK_N), lambda k: (k, 0), transforms=tf_n)])
        pipeline(x_gmem.at[pl.ds(mi * TILE_M, TILE_M), :], wg_gmem.at[:, cols], wu_gmem.at[:, cols])

    out = jax.ShapeDtypeStruct((t, f), dtype)
    kernel = plgpu.kernel(
        jaxtune_gate_up_activation,  # named after what it is, for compiler dumps and profiles
        out_type=(out, out, out),
        scratch_types=[
            plgpu.SMEM((2, BLOCK_M, r), dtype, transforms=tf_k),  # each consumer's rows of xa
            plgpu.SMEM((2, r, BLOCK_N), dtype, transforms=tf_n),  # the sB_gate and sB_up tiles
            plgpu.SMEM((2, BLOCK_M, BLOCK_N), dtype, transforms=tf_n),  # each consumer's output staging
            plgpu.Barrier(num_barriers=4),  # xa per consumer, then sB_gate and sB_up
        ],
        grid=(t // TILE_M, f // BLOCK_N),
        grid_names=("m", "n"),
        num_threads=3,
        thread_name="wg",
        compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )
    return kernel(x, xa, w_gate, w_up, sb_gate, sb_up)
