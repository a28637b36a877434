"""Where every array of a training run lives on the mesh, and creating them there.

Params and optimizer state are born sharded: random init and optimizer init run under
`jax.jit(..., out_shardings=...)` of their `eval_shape`, and checkpoint tensors are placed one at a
time straight into their shards. No host or device ever holds an unsharded copy of the model.
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.model.config import ModelConfig
from jaxtune.model.params import Path, param_specs
from jaxtune.sharding import MeshAxes, partition_spec
from jaxtune.train.state import TrainState, init_state


def param_sharding(cfg: ModelConfig, mesh: Mesh, rules: dict[str, MeshAxes], path: Path) -> NamedSharding:
    spec = param_specs(cfg)[path]
    return NamedSharding(mesh, partition_spec(spec.axes, spec.shape, mesh, rules))


def params_shardings(cfg: ModelConfig, mesh: Mesh, rules: dict[str, MeshAxes]) -> dict:
    return traverse_util.unflatten_dict({p: param_sharding(cfg, mesh, rules, p) for p in param_specs(cfg)})


def place_params(cfg: ModelConfig, mesh: Mesh, rules: dict[str, MeshAxes],
                 host_params: Iterable[tuple[Path, np.ndarray]]) -> dict:
    """Put `(path, host array)` pairs into their shards, one param at a time.

    Each process copies only the slices its own devices hold (`make_array_from_callback`), so on
    a multi-host pod no process uploads the whole model.
    """
    placed = {}
    for path, array in host_params:
        sharding = param_sharding(cfg, mesh, rules, path)
        placed[path] = jax.make_array_from_callback(array.shape, sharding, lambda index, a=array: a[index])
        del array
    return traverse_util.unflatten_dict(placed)


def state_shardings(trainable_shardings, tx: optax.GradientTransformation, abstract_trainable,
                    mesh: Mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments shard like the params they follow."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, trainable_shardings,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: x is None)
    return TrainState(step=replicated, trainable=trainable_shardings, opt_state=opt_shardings, rng=replicated)


def create_state(trainable, tx: optax.GradientTransformation, rng: jax.Array, shardings: TrainState) -> TrainState:
    """`init_state` run under jit so the float32 copies and moments are created in their shards."""
    return jax.jit(lambda t, r: init_state(t, tx, r), out_shardings=shardings)(trainable, rng)


def batch_sharding(mesh: Mesh, rules: dict[str, MeshAxes]) -> NamedSharding:
    """Batches are `[accum, rows, T]`: rows over data×fsdp, length over sequence."""
    return NamedSharding(mesh, PartitionSpec(None, *partition_spec(
        ("act_batch", "act_length"), (mesh.shape["data"] * mesh.shape["fsdp"], mesh.shape["sequence"]),
        mesh, rules)))
