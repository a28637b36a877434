"""What our warp-specialised Mosaic GPU (Hopper) GEMM kernels share besides their SMEM layout
(mosaic_smem.py): two consumer warpgroups and one producer per program, persistent programs (one
per SM) dealing out the tiles round-robin, optionally in 2-CTA clusters. The kernels that use it
(gate_up_activation_mosaic.py, lora_matmul_mosaic.py) differ in what they load, accumulate and
store; the program count, the registers' split, the producer's last waits and the kernel call are
these."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxtune.kernels.mosaic_smem import interpret_params

CONSUMERS = 2
PRODUCER_REGISTERS = 40  # the producer only issues copies; the rest go to the consumers


def program_count(name: str, programs: int | None, tiles: int, cluster: int, interpret: bool) -> int:
    """Persistent programs for `tiles` tiles: `programs` (default one per SM; 3 in interpret mode, so
    that the CPU tests walk several tiles per program and both consumers), at most one per tile, a
    multiple of `cluster`; a ValueError naming `name` (the kernel) where none can run."""
    if programs is None:
        programs = 3 if interpret else _sm_count()
    if programs < 1:
        raise ValueError(f"{name} needs at least one program, got programs={programs}")
    programs = min(programs, tiles) // cluster * cluster
    if programs < 1:
        raise ValueError(f"{name} needs at least {cluster} programs with cluster = {cluster}")
    return programs


def shape_problem(dtype, multiples, row_tiles: int, cluster: int) -> str | None:
    """The shape rules every such kernel has, or the first one broken (one line): a 2-byte float
    `dtype`, each `(name, size, step)` of `multiples` a whole number of steps, `cluster` 1 or 2
    with the `row_tiles` 64-row token tiles pairing up."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (bf16 or fp16 only)"
    for name, size, step in multiples:
        if size % step:
            return f"{name} = {size} is not a multiple of {step}"
    if cluster not in (1, 2) or row_tiles % cluster:
        return f"cluster = {cluster} (1, or 2 with an even number of 64-row tiles)"
    return None


def multicast(cluster: int) -> dict:
    """`copy_gmem_to_smem`'s arguments that split a copy over a cluster's programs and multicast it
    to all of them (none without a cluster)."""
    return {"collective_axes": "cluster"} if cluster > 1 else {}


def consumer_registers() -> int:
    """Registers per consumer thread: the SM's 64k over four warpgroups' worth of 128 threads each,
    less the producer's, shared by the consumers (a multiple of 8, at most 256)."""
    return min(256, (512 - PRODUCER_REGISTERS) // CONSUMERS) // 8 * 8


def produce(tiles: int, programs: int, k_steps: int, stages: int, filled, consumed, copies) -> None:
    """The producer warpgroup: every K step of every tile of this program (`tiles` dealt out
    round-robin over `programs` programs or clusters) into ring slot `step % stages`, once its
    consumers have released it. `copies(loop)` gives (the consumer that owns the tile, 0 when both
    work on it; `frozen(k, slot, barrier)` issuing the frozen operands' copies for K step k;
    `adapter(slot, barrier)` those of the adapters' last step), each copy arriving on `barrier`,
    the slot's "filled" barrier for that consumer (`filled[owner * stages + slot]`)."""
    plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

    @plgpu.nd_loop((tiles,), collective_axes="program")
    def _tile(loop):
        owner, frozen, adapter = copies(loop)

        def load(k, _):
            step = loop.local_index * k_steps + k
            slot = lax.rem(step, stages)

            @pl.when(step >= stages)
            def _():
                plgpu.barrier_wait(consumed.at[slot])

            barrier = filled.at[owner * stages + slot]
            pl.when(k < k_steps - 1)(lambda: frozen(k, slot, barrier))
            pl.when(k == k_steps - 1)(lambda: adapter(slot, barrier))

        lax.fori_loop(0, k_steps, load, None)

    _drain(consumed, tiles, programs, k_steps, stages)


def consume(first, k_steps: int, stages: int, filled, consumed, mma) -> None:
    """A consumer's main loop over one tile, whose K steps are ring steps `first`, `first + 1`, ...:
    wait until each step's slot is filled (`filled(slot)`: the barrier this consumer waits on for
    it), issue `mma(slot)`'s wgmma's (it returns how many), then give the previous step's slot back
    to the producer; at the end wait for all and give the last slot back."""
    def k_step(k, _):
        slot = lax.rem(first + k, stages)
        plgpu.barrier_wait(filled(slot))
        # Keep this step's products in flight; the previous step's are done, so its slot is free.
        plgpu.wgmma_wait(mma(slot))
        pl.when(k > 0)(lambda: plgpu.barrier_arrive(consumed.at[lax.rem(first + k - 1, stages)]))

    lax.fori_loop(0, k_steps, k_step, None)
    plgpu.wgmma_wait(0)
    plgpu.barrier_arrive(consumed.at[lax.rem(first + k_steps - 1, stages)])


def _drain(consumed, tiles: int, programs: int, k_steps: int, stages: int) -> None:
    """The producer's last waits: observe the consumers' final releases of the ring's slots, so that
    no barrier phase is left pending at exit (`tiles` walked by `programs` programs or clusters,
    `k_steps` ring steps each)."""
    program = lax.axis_index("program")
    local = tiles // programs + (program < tiles % programs).astype(jnp.int32)  # nd_loop deals round-robin
    total = local * k_steps

    def wait(step, _):
        plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

    lax.fori_loop(jnp.maximum(total - stages, 0), total, wait, None)


def kernel(body, out_type, programs: int, cluster: int, interpret: bool):
    """`plgpu.kernel` for `body` (named after what it computes, for compiler dumps and profiles):
    `programs // cluster` programs (clusters of `cluster`), the consumers and the producer as
    warpgroups "wg", approximate math for the epilogues' transcendentals."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(programs // cluster,),
        grid_names=("program",),
        **({"cluster": (cluster,), "cluster_names": ("cluster",)} if cluster > 1 else {}),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )


def _sm_count() -> int:
    """SMs of the device the kernel is traced for (an abstract one when lowered ahead of time)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.num_cores if device is not None else jax.devices()[0].core_count
