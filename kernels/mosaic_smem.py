"""What our Mosaic GPU kernels share: where they compile (Hopper), how they lay out 2-byte SMEM
tiles, and the interpret mode their CPU tests use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def on_hopper() -> bool:
    """Whether jax's default device is a Hopper GPU (compute capability 9.x: wgmma, TMA), the one
    generation our Mosaic GPU kernels are written for."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def smem_transforms(dtype, minor: int):
    """Tiling + swizzle for a 2-byte SMEM tile whose minor dimension holds `minor` elements: the
    widest swizzle the row allows (128 bytes from 64 elements), which TMA and wgmma read without
    bank conflicts."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, minor * itemsize)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def interpret_params():
    """Mosaic GPU's interpreter (CPU): simulates SMEM, TMA copies, barriers and wgmma."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
