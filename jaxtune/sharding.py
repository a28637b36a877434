"""Sharding as data: logical axis names → mesh axes, by one rules table.

Every param dimension carries a logical name (`jaxtune.model.params`), and activations are
annotated with `constrain(x, names)`. `DEFAULT_RULES` maps names to mesh axes: FSDP shards the
embed dimension of params (and so of optimizer state), tensor parallelism splits heads / mlp /
vocab Megatron-style, activations shard batch over data×fsdp and length over sequence. A config's
`sharding_rules` overrides entries. Changing parallelism is a config edit, not a code edit.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    # params
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "lora_rank": None,
    # activations
    "act_batch": ("data", "fsdp"),
    "act_length": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def merged_rules(overrides: dict[str, MeshAxes] | None = None) -> dict[str, MeshAxes]:
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        rules[name] = tuple(axes) if isinstance(axes, list) else axes
    return rules


def partition_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                   rules: dict[str, MeshAxes]) -> PartitionSpec:
    """PartitionSpec for one array. A dimension that its mesh axes do not divide, or whose mesh
    axis an earlier dimension already took, stays replicated."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in used)
        if not axes or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh, rules: dict[str, MeshAxes]):
    """NamedShardings for a pytree, from a matching tree of logical-name tuples."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, partition_spec(names, x.shape, mesh, rules)),
        logical_tree, abstract_tree, is_leaf=lambda n: isinstance(n, tuple))


# The mesh and rules activations are constrained against, set by the trainer around tracing.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("jaxtune_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, MeshAxes]):
    """Within this block, `constrain` pins activations to `mesh` by `rules`."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` block (None outside one)."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def active_spec(names: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec | None:
    """The PartitionSpec `constrain` pins an array of `shape` to (None outside `activation_sharding`)."""
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    return partition_spec(names, shape, mesh, rules)


def split_spec(names: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec | None:
    """`active_spec`, or None where that splits nothing (outside `activation_sharding`, or every
    dimension whole): where a kernel can take the whole array as it is."""
    spec = active_spec(names, shape)
    return None if spec is None or all(entry is None for entry in spec) else spec


def per_shard(fn, in_specs, out_specs):
    """`fn` run on each device's shards of the active mesh (`shard_map`): how a kernel runs under
    a mesh, a `pallas_call` having no sharding rule of its own. Replication is not checked: the
    callers' outputs are split as `out_specs` say by construction."""
    return jax.shard_map(fn, mesh=active_mesh(), in_specs=in_specs, out_specs=out_specs, check_vma=False)


def shard_counts(names: tuple[str | None, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """How many pieces each dimension of an array is cut into under the active rules (all 1 outside
    `activation_sharding`)."""
    spec = active_spec(names, shape)
    if spec is None:
        return (1,) * len(shape)
    mesh = active_mesh()
    axes_of = lambda entry: () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(math.prod(mesh.shape[a] for a in axes_of(entry)) for entry in spec)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside `activation_sharding`."""
    spec = active_spec(names, x.shape)
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(active_mesh(), spec))
