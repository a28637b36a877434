"""The params pytree: one table of every leaf's path, shape, logical axes and initialiser.

Params are a plain nested dict whose paths mirror HF names (`layers/self_attn/q_proj/kernel`).
Decoder layers are stacked on a leading `layers` axis and run with `lax.scan`. Projection kernels
keep heads as their own dimension (`q_proj/kernel` is `[L, D, H, hd]`) so tensor parallelism can
shard `heads` without reshapes. This table is the single source of truth: random init, the HF
converters (shape checks) and sharding (logical axes) all read it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtune.model.config import ModelConfig

Path = tuple[str, ...]
Init = Literal["normal", "ones", "zeros"]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One leaf of the params pytree."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis name per dimension (mapped to mesh axes by sharding rules)
    init: Init
    # For projection kernels: how many dimensions (after `layers`) are the input side. HF stores
    # Linear weights as [out, in]; ours is [*in, *out] so `x @ kernel` needs no transpose.
    in_ndim: int | None = None

    @property
    def stacked(self) -> bool:
        return bool(self.axes) and self.axes[0] == "layers"


def param_specs(cfg: ModelConfig) -> dict[Path, ParamSpec]:
    """Every param leaf of `cfg`'s model, keyed by path."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, KH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    specs: dict[Path, ParamSpec] = {
        ("embed_tokens", "embedding"): ParamSpec((V, D), ("vocab", "embed"), "normal"),
        ("layers", "input_layernorm", "scale"): ParamSpec((L, D), ("layers", "embed"), "ones"),
        ("layers", "self_attn", "q_proj", "kernel"): ParamSpec(
            (L, D, H, hd), ("layers", "embed", "heads", "head_dim"), "normal", in_ndim=1),
        ("layers", "self_attn", "k_proj", "kernel"): ParamSpec(
            (L, D, KH, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal", in_ndim=1),
        ("layers", "self_attn", "v_proj", "kernel"): ParamSpec(
            (L, D, KH, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal", in_ndim=1),
        ("layers", "self_attn", "o_proj", "kernel"): ParamSpec(
            (L, H, hd, D), ("layers", "heads", "head_dim", "embed"), "normal", in_ndim=2),
        ("layers", "post_attention_layernorm", "scale"): ParamSpec((L, D), ("layers", "embed"), "ones"),
        ("layers", "mlp", "gate_proj", "kernel"): ParamSpec(
            (L, D, F), ("layers", "embed", "mlp"), "normal", in_ndim=1),
        ("layers", "mlp", "up_proj", "kernel"): ParamSpec(
            (L, D, F), ("layers", "embed", "mlp"), "normal", in_ndim=1),
        ("layers", "mlp", "down_proj", "kernel"): ParamSpec(
            (L, F, D), ("layers", "mlp", "embed"), "normal", in_ndim=1),
        ("norm", "scale"): ParamSpec((D,), ("embed",), "ones"),
    }
    if cfg.qkv_bias:
        specs[("layers", "self_attn", "q_proj", "bias")] = ParamSpec(
            (L, H, hd), ("layers", "heads", "head_dim"), "zeros")
        for name in ("k_proj", "v_proj"):
            specs[("layers", "self_attn", name, "bias")] = ParamSpec(
                (L, KH, hd), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.o_bias:
        specs[("layers", "self_attn", "o_proj", "bias")] = ParamSpec((L, D), ("layers", "embed"), "zeros")
    if cfg.mlp_bias:
        for name in ("gate_proj", "up_proj"):
            specs[("layers", "mlp", name, "bias")] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
        specs[("layers", "mlp", "down_proj", "bias")] = ParamSpec((L, D), ("layers", "embed"), "zeros")
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            specs[("layers", "self_attn", name, "scale")] = ParamSpec(
                (L, hd), ("layers", "head_dim"), "ones")
    if not cfg.tie_word_embeddings:
        specs[("lm_head", "kernel")] = ParamSpec((D, V), ("embed", "vocab"), "normal", in_ndim=1)
    return specs


def logical_axes(cfg: ModelConfig) -> dict:
    """The params pytree with each leaf replaced by its tuple of logical axis names."""
    return traverse_util.unflatten_dict({p: s.axes for p, s in param_specs(cfg).items()})


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """`jax.ShapeDtypeStruct` leaves: the params' shapes without allocating them."""
    return traverse_util.unflatten_dict(
        {p: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)) for p, s in param_specs(cfg).items()})


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Random weights as HF initialises them: normal(0, initializer_range), norms 1, biases 0.

    Each leaf's key is folded in from its path, so adding a leaf never changes the others.
    Jit this with `out_shardings` to create params already sharded.
    """
    specs = param_specs(cfg)
    return traverse_util.unflatten_dict(
        {path: init_leaf(cfg, spec, jax.random.fold_in(rng, path_seed(path)), dtype) for path, spec in specs.items()})


def init_leaf(cfg: ModelConfig, spec: ParamSpec, key: jax.Array, dtype, shape: tuple[int, ...] | None = None):
    """One leaf by its spec's init rule; `shape` overrides the spec's (e.g. one layer's slice)."""
    shape = spec.shape if shape is None else shape
    if spec.init == "ones":
        return jnp.ones(shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(shape, dtype)
    return (cfg.initializer_range * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def path_seed(path: Path) -> int:
    # A stable 31-bit hash of the path (Python's hash() is salted per process).
    h = 0
    for ch in "/".join(path).encode():
        h = (h * 131 + ch) % (2**31 - 1)
    return h


def flatten(params: dict) -> dict[Path, jax.Array | np.ndarray]:
    """Nested params → {path tuple: leaf}. LoRA/NF4 leaves are kept whole."""
    return traverse_util.flatten_dict(params)
