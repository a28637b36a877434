"""The decoder layers' params one layer at a time, for the unrolled layer loop (`scan_layers: false`).

Params keep every layer's tensor stacked as `[L, ...]` (one leaf per kind of tensor: what the layer
scan, sharding rules and checkpoints expect). Unrolled, each layer needs its slice, and XLA
materialises a slice of a stacked array as a copy. Under remat that is costly twice over: the
forward's slice of a frozen kernel is also the backward's (XLA merges the two), so every layer's
copy stays alive from the forward to the backward (Llama-3-8B, LoRA, seq 4096: 32.9 GiB instead
of the loop's 20.2), and the copies take time (about 5% of that step).

So the trainer hands the step its frozen layer params already split, outside of jit: each stacked
leaf under `layers` becomes a tuple of per-layer arrays (`split_layers`), which the unrolled loop
indexes for free (`per_layer`). Trainable leaves stay stacked (the optimizer and checkpoints work
on them); inside the step they are split with `jnp.split`, whose gradient is one concatenate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def _is_split(x) -> bool:
    return isinstance(x, tuple)


def _drop_layer_axis(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _split_leaf(x) -> tuple:
    """A stacked `[L, ...]` leaf as a tuple of L per-layer leaves: device arrays (each with the
    stacked array's sharding less its layer axis, sliced by a jitted op, so every process of a
    multi-host run takes part) or abstract `ShapeDtypeStruct`s."""
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = _drop_layer_axis(x.sharding) if x.sharding is not None else None
        return tuple(jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding) for _ in range(x.shape[0]))
    sharding = _drop_layer_axis(x.sharding)
    take = jax.jit(lambda stacked, i: stacked[i], out_shardings=sharding)
    return tuple(take(x, i) for i in range(x.shape[0]))


def split_layers(params: dict, *, donate: bool = False) -> dict:
    """`params` (typically the frozen half, None where trainable) with each leaf under `layers`
    split into a tuple of per-layer leaves. With `donate`, each stacked device array is deleted
    right after its split, so the device holds at most one leaf twice (the caller must hold no
    other reference to it)."""
    if "layers" not in params:
        return params
    leaves, treedef = jax.tree.flatten(params["layers"])
    split = []
    for leaf in leaves:
        split.append(_split_leaf(leaf))
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    return {**params, "layers": jax.tree.unflatten(treedef, split)}


def split_layer_shardings(shardings: dict, num_layers: int) -> dict:
    """The shardings of `split_layers(params)`: each layer's leaf without the layer axis."""
    if "layers" not in shardings:
        return shardings
    out = dict(shardings)
    out["layers"] = jax.tree.map(lambda s: (_drop_layer_axis(s),) * num_layers, shardings["layers"])
    return out


def per_layer(layers, num_layers: int) -> list:
    """The layer params as a list of `num_layers` trees, from stacked leaves (split in one
    `jnp.split` each: its transpose is a single concatenate, not one padded sum per layer) or from
    leaves `split_layers` already split (free)."""
    def parts(x):
        if _is_split(x):
            if len(x) != num_layers:
                raise ValueError(f"layer params split into {len(x)} layers, the model has {num_layers}")
            return list(x)
        if x is None:
            return [None] * num_layers
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: index one by one
            return [x[i] for i in range(num_layers)]
        return [p.reshape(p.shape[1:]) for p in jnp.split(x, num_layers)]

    split = jax.tree.map(parts, layers, is_leaf=lambda x: _is_split(x) or x is None)
    return [jax.tree.map(lambda p, i=i: p[i], split, is_leaf=lambda x: isinstance(x, list))
            for i in range(num_layers)]


def has_split_layers(params: dict) -> bool:
    """Whether `split_layers` split any leaf of these params (the layer scan cannot take them)."""
    return any(_is_split(x) for x in jax.tree.leaves(params.get("layers", {}), is_leaf=_is_split))
