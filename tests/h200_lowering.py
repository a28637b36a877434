"""Lowering a jitted kernel call for an H200 from the CPU: Mosaic GPU's layout inference and SMEM
budget, and Triton's lowering rules, run at trace-and-lower time, so a kernel that cannot compile
for the GPU fails a CPU test (interpret mode skips all of that)."""

from __future__ import annotations

import warnings

import jax
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

H200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")


def lower_for_h200(fn, *args) -> str:
    """The StableHLO text of `jax.jit(fn)` lowered for CUDA on an abstract H200 (`args`: arrays or
    `jax.ShapeDtypeStruct`s)."""
    with warnings.catch_warnings(), use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H200)):
        warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton is deprecated"
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
