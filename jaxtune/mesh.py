"""The device mesh: `data`, `fsdp`, `tensor` and `sequence` axes over every device of every host.

`mesh: {data: -1, fsdp: 1, tensor: 1, sequence: 1}` in the config; one entry may be -1 ("the
devices left over"). Axolotl's `dp_shard_size`, `tensor_parallel_size` and
`context_parallel_size` set fsdp, tensor and sequence when `mesh` does not.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxtune.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "sequence")


def resolve_mesh_shape(requested: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill in -1 and check the product equals `num_devices`; errors name the offending key."""
    unknown = set(requested) - set(AXES)
    if unknown:
        raise ConfigError(f"mesh: unknown axis {sorted(unknown)[0]!r}; axes are {', '.join(AXES)}")
    shape = {axis: int(requested.get(axis, 1)) for axis in AXES}
    free = [axis for axis, size in shape.items() if size == -1]
    bad = [axis for axis, size in shape.items() if size != -1 and size < 1]
    if bad:
        raise ConfigError(f"mesh.{bad[0]} must be a positive integer or -1, got {shape[bad[0]]}")
    if len(free) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
    fixed = math.prod(size for size in shape.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes ({_describe(shape)}) use {fixed} devices, which does not divide "
                f"the {num_devices} devices available")
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh: {_describe(shape)} = {fixed} devices, but {num_devices} are available")
    return shape


def _describe(shape: dict[str, int]) -> str:
    return " × ".join(f"{axis}={size}" for axis, size in shape.items() if size != 1) or "all 1"


def make_mesh(requested: dict[str, int], devices: list | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor, sequence), tensor innermost (fastest links)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = resolve_mesh_shape(requested, len(devices))
    sizes = tuple(shape[axis] for axis in AXES)
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(sizes)  # CPU or an unusual topology: plain order
    return Mesh(grid, AXES)

