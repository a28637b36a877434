"""Multi-host start-up: `jax.distributed.initialize()` when the environment says multi-process.

JAX's own multi-controller runtime is the distributed engine (NCCL between GPUs). It reads its
coordinator, process count and id from JAX's variables, SLURM (`SLURM_NTASKS` > 1 with
`SLURM_JOB_ID`) or Open MPI (`OMPI_COMM_WORLD_SIZE`); with none of those set, a run is one process.
"""

from __future__ import annotations

import os

import jax

_JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def is_multiprocess_environment(env=os.environ) -> bool:
    if all(v in env for v in _JAX_VARS):
        return int(env["JAX_NUM_PROCESSES"]) > 1
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_if_needed() -> None:
    """Join the other processes of the job (once); a no-op for single-process runs."""
    if not is_multiprocess_environment() or jax.distributed.is_initialized():
        return
    if all(v in os.environ for v in _JAX_VARS):
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()  # SLURM / Open MPI cluster detection
