"""The device mesh: `data`, `fsdp`, `tensor` and `sequence` axes over every device of every host.

`mesh: {data: -1, fsdp: 1, tensor: 1, sequence: 1}` in the config; one entry may be -1 ("the
devices left over"). Axolotl's `dp_shard_size`, `tensor_parallel_size` and
`context_parallel_size` set fsdp, tensor and sequence when `mesh` does not.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxtune.config.schema import MESH_AXES as AXES, MeshConfig
from jaxtune.errors import ConfigError


def make_mesh(requested: dict[str, int], devices: list | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor, sequence), tensor innermost (fastest links)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    unknown = set(requested) - set(AXES)
    if unknown:
        raise ConfigError(f"mesh: unknown axis {sorted(unknown)[0]!r}; axes are {', '.join(AXES)}")
    # MeshConfig checks the sizes and resolves -1 (it is jax-free, so `validate` uses it too).
    shape = MeshConfig(**requested).shape(len(devices))
    sizes = tuple(shape[axis] for axis in AXES)
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(sizes)  # CPU or an unusual topology: plain order
    return Mesh(grid, AXES)

